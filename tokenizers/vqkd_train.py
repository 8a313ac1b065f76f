"""``beit tokenizer train vqkd``: train a BEiT v2 VQ-KD tokenizer on your images, distilling a teacher.

    beit tokenizer train vqkd --train_shards 'data/train-*.tar' --val_shards 'data/val-*.tar' \\
        --teacher_path clip-vit-base-patch16/ --output_dir runs/vqkd          # a CLIP / DINO / DINOv2 folder
    accelerate launch -m beit.tokenizers.train vqkd ...                           # several GPUs / nodes

The defaults are the paper's base recipe (unilm beit2 ``TOKENIZER.md`` / ``run_vqkd_training.py``): ViT-B/16
encoder at 224 px, 8192 x 32 codebook (k-means start, EMA decay 0.99), a 3-block decoder as wide as the encoder,
cosine loss to the teacher's features, AdamW (0.9, 0.99), weight decay 1e-4, lr 2e-4 (the reference's 5e-5 per 128
images at its global batch 512), 10 warmup epochs from 1e-6, cosine to 1e-5, 100 epochs, random resized crops from
8 % with flips, no colour jitter. Scale any of it down with options. Teachers: see ``beit.tokenizers.teachers``.

Beyond the reference: dead codes are restarted from recent encoder outputs (``--restart_dead_codes``, on by
default), codebook usage and perplexity are logged during training and measured on ``--val_shards``, and
a run resumes exactly (mid-epoch) from its newest verified checkpoint when the same command is run again; SIGTERM,
SIGINT and SIGUSR1 stop it after the current step with a checkpoint there (exit status 75, ``beit.runtime.stopping``).

Writes into ``output_dir``: ``vqkd.safetensors`` + ``vqkd.json`` (``load_tokenizer("vqkd", output_dir)``,
``--tokenizer vqkd --tokenizer_path output_dir`` for pretraining and the token cache), ``vqkd_unilm.pth``
(the whole model in unilm's layout, ``{"model": state_dict}``, which unilm's ``VQKD`` loads) with
``vqkd_unilm.json`` (its unilm constructor arguments), ``final_metrics.json``, ``metrics.jsonl``,
``config.yaml``, ``checkpoints/`` and ``tensorboard/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from beit.config import check_finite_numbers, field, load_yaml, save_config, to_dict
from beit.data.pipelines.transforms import AugmentOptions
from beit.options.common import DataOptions, ModelOptions, OptimOptions, PrecisionOptions, RunOptions
from beit.runtime.faults import SetupError
from beit.tokenizers.fitting import TokenizerViewOptions
from beit.tokenizers.teachers import TEACHER_KINDS
from beit.tokenizers.vqkd_model import PROCESS_TYPES

# what defines the tokenizer and its target: a resumed run must keep them (the teacher's weights are compared
# by fingerprint, so its folder may move but not change)
RESUME_KEYS = ("input_size", "patch_size", "model_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "vocab_size",
               "code_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "process_type", "teacher",
               "teacher_model", "teacher_model_kwargs", "teacher_input_size", "ema_decay", "commitment_weight")
TOKENIZER_STEM, UNILM_FILE = "vqkd", "vqkd_unilm.pth"


@dataclass
class VQKDTrainConfig(RunOptions, PrecisionOptions, OptimOptions, ModelOptions, TokenizerViewOptions,
                      AugmentOptions, DataOptions):
    """Shared sections (beit.options.common) first, then VQ-KD's own options."""
    # the shared options with the reference's defaults
    epochs: int = field(100)
    lr: float = field(2e-4)
    min_lr: float = field(1e-5)
    warmup_epochs: float = field(10.0)
    weight_decay: float = field(1e-4)
    output_dir: str = field("runs/vqkd")
    vocab_size: int = field(8192)
    input_size: int = field(224)
    interpolation: str = field("bicubic")
    color_jitter: float = field(0.0)
    drop_path: float = field(0.0)
    # data
    allow_remote_shards: bool = field(False, help="allow pipe:/http(s) shard specs (they run commands / fetch URLs)")
    shuffle_buffer: int = field(1000, help="samples in the streaming shuffle buffer")
    # the tokenizer (the encoder's size: model_size / embed_dim / depth / num_heads / mlp_ratio / patch_size)
    code_dim: int = field(32, help="dimension of the l2-normalised codes")
    decoder_embed_dim: int = field(0, help="decoder width (0: the encoder's)")
    decoder_depth: int = field(3, help="decoder blocks")
    decoder_num_heads: int = field(0, help="decoder attention heads (0: the encoder's)")
    process_type: str = field("default", help="encoder input: default ([0,1] -> [-1,1], as the released "
                              "tokenizers) | imagenet_norm | dall-e (unchanged)")
    ema_decay: float = field(0.99, help="EMA decay of the codebook")
    commitment_weight: float = field(1.0, help="weight of ||sg(code) - z||^2 (the reference's beta)")
    kmeans_init: bool = field(True, help="start the codebook from a spherical k-means of the first batch's codes "
                              "(false: random unit rows)")
    kmeans_iters: int = field(10, help="k-means iterations of the codebook initialisation")
    # codebook health
    restart_dead_codes: bool = field(True, help="restart codebook rows unused for restart_after_steps from this "
                                     "step's encoder outputs (false: the reference's behaviour)")
    restart_after_steps: int = field(50, help="optimizer steps without any use after which a row counts as dead")
    eval_every: int = field(0, help="held-out codebook evaluation every N optimizer steps (0: about 10 times a "
                            "run); always at the end")
    # the teacher
    teacher: str = field("auto", help="teacher kind: auto | " + " | ".join(f"{k} ({v[1]})" for k, v in
                                                                           TEACHER_KINDS.items()))
    teacher_path: str = field("", help="the teacher: a Hugging Face folder, a timm checkpoint file, or a run folder")
    teacher_model: str = field("", help="--teacher timm: the timm model name, e.g. vit_base_patch16_clip_224")
    teacher_model_kwargs: dict = field(default_factory=dict, help="--teacher timm: constructor arguments of a "
                                       "non-standard size, e.g. '{embed_dim: 384, depth: 6}'")
    teacher_input_size: int = field(0, help="teacher input side in px (0: grid x its patch size where it takes any "
                                    "size, else its own input size)")
    teacher_resample: bool = field(True, help="resample a teacher feature map of another size to the token grid "
                                   "(false: refuse it)")
    # optimisation
    total_steps: int = field(0, help="optimizer steps in total (0: epochs x steps per epoch)")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99], help="AdamW betas")
    eps: float = field(1e-8, help="AdamW epsilon")
    warmup_start_lr: float = field(1e-6, help="learning rate at the first warmup step")

    def validate(self) -> None:
        """Checks that need no files; raises ValueError naming the option."""
        from beit.tokenizers.fitting import check_grid
        self.check_choices()
        check_finite_numbers(self)
        check_grid("vqkd", self.input_size, self.patch_size, self.model_grid, "patch_size")
        self.dims()
        for name in ("decoder_depth", "vocab_size", "code_dim", "restart_after_steps", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_steps < 0 or self.epochs < 0 or (self.total_steps == 0 and self.epochs == 0):
            raise ValueError("set epochs >= 1 or total_steps >= 1")
        if self.process_type not in PROCESS_TYPES:
            raise ValueError(f"process_type must be one of {PROCESS_TYPES}, got {self.process_type!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.teacher not in ("auto", *TEACHER_KINDS):
            raise ValueError(f"--teacher must be auto or one of {list(TEACHER_KINDS)}, got {self.teacher!r}")
        if not self.teacher_path:
            raise ValueError("VQ-KD distils a teacher's features: pass --teacher_path (a Hugging Face CLIP / DINO / "
                             "DINOv2 folder, a timm checkpoint with --teacher_model, or one of your BEiT/Swin runs)")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        self.check_augment()
        self.check_optim()
        self.check_run()
        self.check_data()

    @property
    def grid(self) -> tuple[int, int]:
        return (self.input_size // self.patch_size,) * 2

    def dims(self) -> dict:
        """The encoder's embed_dim / depth / num_heads / mlp_ratio (model_size preset < explicit sizes) and the
        decoder's (0: the encoder's width and heads)."""
        from beit.modeling.mim import beit_dims
        enc = beit_dims(self.model_size, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                        mlp_ratio=self.mlp_ratio)
        dec = dict(decoder_embed_dim=self.decoder_embed_dim or enc["embed_dim"], decoder_depth=self.decoder_depth,
                   decoder_num_heads=self.decoder_num_heads or enc["num_heads"])
        if dec["decoder_embed_dim"] % dec["decoder_num_heads"]:
            raise ValueError(f"decoder_embed_dim {dec['decoder_embed_dim']} is not divisible by decoder_num_heads "
                             f"{dec['decoder_num_heads']}")
        return {**{k: enc[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")}, **dec}

    def model_kwargs(self, teacher_dim: int) -> dict:
        return dict(img_size=self.input_size, patch_size=self.patch_size, n_code=self.vocab_size,
                    code_dim=self.code_dim, teacher_dim=teacher_dim, decay=self.ema_decay, beta=self.commitment_weight,
                    process_type=self.process_type, kmeans_init=self.kmeans_init, **self.dims())


def run_vqkd(cfg: VQKDTrainConfig) -> dict:
    """Train (or resume) a VQ-KD tokenizer; returns the final summary (also written to final_metrics.json).
    Bad input raises SetupError before any compute; faults during the run raise RunFault, with a message."""
    from beit.runtime.run_lock import end_with_launcher, open_run, world_size
    from beit.runtime.stopping import stop_signals

    end_with_launcher()
    with stop_signals() as stop:                           # SIGTERM/SIGINT/SIGUSR1: checkpoint at the step, then stop
        inputs = check_inputs(cfg, world_size())           # every input checked (the teacher loaded), no compute
        with open_run(cfg.output_dir) as latest:           # one run per folder; the newest intact checkpoint
            check_resume(cfg, latest, inputs.teacher_fp)
            run = VQKDRun(cfg, inputs)                     # accelerator, model, optimizer, schedule, loaders
            run.restore(latest)
            run.train(stop)                                # the engine, epoch after epoch, checkpoints, evaluations
            return run.finish()                            # held-out codebook health, the tokenizer in both layouts


@dataclass
class VQKDInputs:
    shards: list[str]
    val_shards: list[str]
    teacher: object
    teacher_fp: str
    grad_accum_steps: int


def check_inputs(cfg: VQKDTrainConfig, world: int) -> VQKDInputs:
    """Every check that reads files but computes nothing: data, held-out split, batch split, the teacher (loaded on
    the CPU) and its grid. Bad input raises SetupError."""
    from beit.data.storage.shardspec import expand_shards
    from beit.runtime.run_lock import check_output_dir, main_print
    from beit.runtime.scaling import grad_accum_for
    from beit.runtime.trackers import check_trackers
    from beit.tokenizers.teachers import load_teacher

    try:
        cfg.validate()
        check_output_dir(cfg.output_dir)
        check_trackers(cfg.trackers())
        found = cfg.folder_shards(labelled=False, hold_out=not cfg.val_shards, log=main_print)
        if found is not None:
            main_print(f"--data {cfg.data}: {found.describe()}")
        shards = expand_shards(found.train if found else cfg.train_shards, allow_remote=cfg.allow_remote_shards)
        val_spec = (found.val if found else "") or cfg.val_shards
        val_shards = expand_shards(val_spec, allow_remote=cfg.allow_remote_shards) if val_spec else []
        if val_shards and len(val_shards) < world:
            raise ValueError(f"{len(val_shards)} held-out shard(s) for {world} processes: each process needs one; "
                             "split the held-out set into more shards")
        accum = grad_accum_for(cfg.global_batch_size, cfg.batch_size, world) if cfg.global_batch_size else \
            cfg.grad_accum_steps
        teacher = load_teacher(cfg.teacher, cfg.teacher_path, grid=cfg.grid, model=cfg.teacher_model,
                               input_size=cfg.teacher_input_size, resample=cfg.teacher_resample,
                               model_kwargs=cfg.teacher_model_kwargs)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        raise SetupError(str(e)) from e
    return VQKDInputs(shards, val_shards, teacher, teacher.fingerprint(), accum)


def check_resume(cfg: VQKDTrainConfig, latest: Path | None, teacher_fp: str) -> None:
    """Refuse to resume ``latest`` with another tokenizer architecture or another teacher."""
    from beit.checkpoints.checkpointing import TRAIN_STATE, check_resume_compatible
    if latest is None:
        return
    out = Path(cfg.output_dir)
    try:
        if (out / "config.yaml").is_file():
            check_resume_compatible(to_dict(load_yaml(VQKDTrainConfig, out / "config.yaml")), to_dict(cfg),
                                    RESUME_KEYS, where=str(out))
        saved = json.loads((latest / TRAIN_STATE).read_text()).get("teacher_fingerprint")
        if saved not in (None, teacher_fp):
            raise ValueError(f"cannot resume {out}: the teacher at {cfg.teacher_path} has other weights than the one "
                             "this run was trained with; use a new --output_dir or the original teacher")
    except ValueError as e:
        raise SetupError(str(e)) from e


class ViewSample:
    """The loader's ``map_fn``: one augmented view (uint8 [3, S, S]) of the image (seeded per sample)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img, sample: dict) -> dict:
        return {"image": self.transform(img)[0]}


def view_sample(cfg: VQKDTrainConfig, train: bool) -> ViewSample:
    """Training: random resized crop + flip (+ jitter); held-out: the centre square, nothing random."""
    from beit.data.pipelines.transforms import TwoViewTransform
    kw = (dict(scale=(cfg.crop_scale_min, 1.0), color_jitter=cfg.color_jitter, hflip=cfg.hflip) if train else
          dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0, hflip=0.0))
    return ViewSample(TwoViewTransform(image_size=cfg.input_size, tokenizer_size=cfg.input_size,
                                       interpolation=cfg.interpolation, tokenizer_interpolation=cfg.interpolation,
                                       **kw))


class VQKDRun:
    """The pieces of one VQ-KD training run, built from its checked inputs."""

    def __init__(self, cfg: VQKDTrainConfig, inputs: VQKDInputs):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from beit.data.loading.global_order import build_loader_for_order
        from beit.data.loading.heldout import heldout_loader
        from beit.optim import create_adamw, create_schedule, param_groups_weight_decay, warmup_for
        from beit.runtime.precision import resolve_mixed_precision
        from beit.runtime.run_lock import main_print
        from beit.runtime.scaling import accelerator_kwargs_handlers, refuse_under_fsdp
        from beit.tokenizers.vqkd_model import VQKDModel

        self.cfg, self.inputs, self.out = cfg, inputs, Path(cfg.output_dir)
        accum = inputs.grad_accum_steps
        self.accelerator = acc = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision), gradient_accumulation_steps=accum,
            project_dir=str(self.out),
            kwargs_handlers=accelerator_kwargs_handlers(cfg.dist_timeout_s))
        try:  # the codebook update and the held-out evaluation run on the whole (unwrapped) model
            refuse_under_fsdp(acc.distributed_type, "VQ-KD training", "use DDP (accelerate launch's default)")
        except ValueError as e:
            raise SetupError(str(e)) from None
        set_seed(cfg.seed)
        model = VQKDModel(**cfg.model_kwargs(inputs.teacher.dim))
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.teacher = inputs.teacher.to(acc.device)
        optimizer = create_adamw(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr,
                                 betas=tuple(cfg.betas), eps=cfg.eps)
        try:  # the loader's start-up checks (worker split, empty shards) are bad input too
            self.loader = build_loader_for_order(
                cfg.data_order, inputs.shards, map_fn=view_sample(cfg, train=True), batch_size=cfg.batch_size,
                num_workers=cfg.loader_workers, rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                shuffle_buffer=cfg.shuffle_buffer, batches_per_epoch=cfg.batches_per_epoch or None,
                allow_remote=cfg.allow_remote_shards, max_bad_fraction=cfg.max_bad_fraction,
                small_image_size=cfg.input_size, labels=False, resampled=cfg.resampled, batch_multiple=accum,
                pin_memory=acc.device.type == "cuda")
            self.steps_per_epoch = len(self.loader) // accum
            if self.steps_per_epoch < 1:
                raise ValueError(f"an epoch has {len(self.loader)} batches per process, fewer than grad_accum_steps="
                                 f"{accum}: lower batch_size/grad_accum_steps or add data")
        except ValueError as e:
            raise SetupError(str(e)) from None
        self.total_steps = cfg.total_steps or cfg.epochs * self.steps_per_epoch
        self.warmup = warmup_for(self.steps_per_epoch, self.total_steps, cfg.warmup_epochs, cfg.warmup_steps,
                                 main_print)
        self.schedule = create_schedule(cfg.lr_schedule, optimizer, lr=cfg.lr, min_lr=cfg.min_lr,
                                        total_steps=self.total_steps, warmup_steps=self.warmup,
                                        weight_decay=cfg.weight_decay,
                                        warmup_start_lr=cfg.warmup_start_lr if self.warmup else 0.0)
        self.val_loader = (heldout_loader(inputs.val_shards, view_sample(cfg, train=False), acc,
                                          batch_size=cfg.batch_size, num_workers=cfg.loader_workers, seed=cfg.seed,
                                          lazy_jpeg=True) if inputs.val_shards else None)
        if acc.is_main_process:  # every start-up check has passed
            save_config(cfg, self.out / "config.yaml")
        acc.wait_for_everyone()
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.core = acc.unwrap_model(self.model)

    def restore(self, latest: Path | None) -> None:
        """The saved state of ``latest`` (weights and codebook, optimizer, schedule, data position), the logger."""
        from beit.checkpoints.checkpointing import resume_run
        from beit.runtime.run_logging import RunLogger
        from beit.tokenizers.vqkd_engine import VQKDMeter, VQKDState

        self.state = VQKDState()
        self.meter = VQKDMeter(self.cfg.vocab_size, self.accelerator.device)
        self.saved_step = None
        if latest is not None:
            saved, epoch_done = resume_run(self.accelerator, latest, self.schedule, self.loader,
                                           {"meter": self.meter.load_state_dict})
            self.state = VQKDState(**saved["train"])
            self.state.epoch += epoch_done
            self.saved_step = self.state.step
        self.logger = RunLogger(self.accelerator, self.out, resume_step=self.state.step if latest else None,
                                cfg=self.cfg)
        self.log_start(latest)

    def log_start(self, latest: Path | None) -> None:
        from beit.runtime.run_logging import data_summary

        cfg, acc, log, accum, dims = self.cfg, self.accelerator, self.logger.info, self.inputs.grad_accum_steps, \
            self.cfg.dims()
        n_params = sum(p.numel() for p in self.core.parameters()) / 1e6
        log(f"VQ-KD tokenizer: {n_params:.2f}M trained params, {cfg.input_size} px, grid {cfg.grid[0]}x{cfg.grid[1]}, "
            f"encoder {dims['embed_dim']} wide x {dims['depth']}, {cfg.vocab_size} x {cfg.code_dim} codebook, decoder "
            f"{dims['decoder_embed_dim']} wide x {cfg.decoder_depth}")
        log(f"teacher {self.teacher.describe()}")
        log(f"processes {acc.num_processes}, device {acc.device}, mixed precision {acc.mixed_precision}; effective "
            f"batch {cfg.batch_size * accum * acc.num_processes} = {cfg.batch_size} x {accum} accum x "
            f"{acc.num_processes} proc; lr {cfg.lr:g} (not rescaled), {self.total_steps} steps "
            f"({self.steps_per_epoch}/epoch), warmup {self.warmup}; dead-code restarts "
            + (f"after {cfg.restart_after_steps} unused steps" if cfg.restart_dead_codes else "off"))
        for line in data_summary(self.loader, cfg.batch_size, acc.num_processes):
            log(line)
        log(f"held-out: {len(self.inputs.val_shards)} shard(s): codebook usage every {self.eval_every()} steps and at "
            "the end" if self.val_loader is not None else
            "held-out: none (no codebook usage on held-out images; pass --val_shards, or --data with --val_fraction)")
        log(f"resumed from {latest} at step {self.state.step} (epoch {self.state.epoch})" if latest else
            f"starting a new run in {self.out}")

    def eval_every(self) -> int:
        log_every = self.cfg.log_every
        return self.cfg.eval_every or max(log_every, round(self.total_steps / 10 / log_every) * log_every)

    def held_out(self, step: int) -> dict:
        from beit.tokenizers.vqkd_engine import evaluate_codebook
        ev = {f"val/{k}": v for k, v in evaluate_codebook(self.core, self.teacher, self.val_loader,
                                                           self.accelerator).items()}
        self.logger.log(ev, step=step)
        return ev

    def checkpoint(self, st, stopping: bool = False) -> Path:
        """A checkpoint every ``checkpoint_every`` optimizer steps, at the last, and at a stop (once per step);
        returns the step's checkpoint. The meter's open logging window goes with this rank's data position."""
        from beit.checkpoints.checkpointing import checkpoint_path, save_checkpoint

        if self.saved_step == st.step or not stopping and st.step % self.cfg.checkpoint_every \
                and st.step != self.total_steps:
            return checkpoint_path(self.out, st.step)
        st.train_seconds = self.time_before + time.time() - self.t_start
        train_state = {"train": st.to_dict(), "schedule": self.schedule.state_dict(),
                       "teacher_fingerprint": self.inputs.teacher_fp}
        path = save_checkpoint(self.accelerator, self.out, st.step, train_state,
                               {"loader": self.loader.state_dict(), "meter": self.meter.state_dict()},
                               keep_last=self.cfg.keep_last)
        self.saved_step = st.step
        self.logger.info(f"checkpoint saved: {path}")
        return path

    def train(self, stop) -> None:
        """Epochs of the engine until ``total_steps`` optimizer steps are done (held-out evaluations beside);
        ``stop`` (``beit.runtime.stopping``) ends it after a step with that step's checkpoint."""
        from beit.runtime.run_logging import data_error_metrics
        from beit.tokenizers.vqkd_engine import train_one_epoch

        cfg, acc, state, loader, every, meter = (self.cfg, self.accelerator, self.state, self.loader,
                                                 self.eval_every(), self.meter)

        def after_step(st) -> None:
            if self.val_loader is not None and st.step % every == 0 and st.step != self.total_steps:
                self.held_out(st.step)
            self.checkpoint(st)
            stop.check(acc, st.step, lambda: self.checkpoint(st, stopping=True))

        self.t_start, self.time_before = time.time(), state.train_seconds
        eff_batch = cfg.batch_size * self.inputs.grad_accum_steps * acc.num_processes
        with self.logger.progress(self.total_steps, initial=state.step, desc="vqkd", images_per_step=eff_batch) as bar:
            while state.step < self.total_steps:
                loader.set_epoch(state.epoch)
                train_one_epoch(self.model, self.teacher, loader, self.optimizer, self.schedule, acc, state,
                                total_steps=self.total_steps, clip_grad=cfg.clip_grad, log_every=cfg.log_every,
                                logger=self.logger, meter=meter, seed=cfg.seed, kmeans_iters=cfg.kmeans_iters,
                                restart_after=cfg.restart_after_steps, restart=cfg.restart_dead_codes,
                                after_step=after_step, progress=bar, data_stats=lambda: data_error_metrics(loader, acc))
                if state.step < self.total_steps:
                    state.epoch += 1

    def finish(self) -> dict:
        """The held-out codebook health, the tokenizer in both layouts, final_metrics.json; the summary."""
        from beit.runtime.run_logging import data_error_metrics

        cfg, acc, state, out = self.cfg, self.accelerator, self.state, self.out
        summary = {"step": state.step, "epoch": state.epoch, "codes_restarted": state.codes_restarted,
                   "train_seconds": round(state.train_seconds, 1), "teacher": self.teacher.describe(),
                   "output_dir": str(out), **data_error_metrics(self.loader, acc)}
        if self.val_loader is not None:
            summary.update(self.held_out(state.step))
        last = self.logger.last_logged
        summary.update({f"train/{k}": last[k] for k in ("rec_loss", "codebook_usage", "codebook_perplexity")
                        if k in last})
        if acc.is_main_process:
            summary["tokenizer"] = str(write_tokenizer(self.core, cfg, self.teacher, out))
            (out / "final_metrics.json").write_text(json.dumps(summary, indent=1))
        held = (f"held-out codebook usage {summary['val/codebook_usage']:.1%}, perplexity "
                f"{summary['val/codebook_perplexity']:.0f} of {cfg.vocab_size} on {summary['val/images']} images"
                if self.val_loader is not None else "no held-out shards (pass --val_shards to measure codebook usage)")
        self.logger.info(f"finished: {state.step} steps, {state.codes_restarted} codes restarted; {held}  ->  "
                         f"{out}/{TOKENIZER_STEM}.safetensors, {out}/{UNILM_FILE}")
        self.logger.finish(summary, state.step, files=("config.yaml", "final_metrics.json", f"{TOKENIZER_STEM}.json",
                                                       Path(UNILM_FILE).with_suffix(".json").name))
        acc.end_training()
        return summary


def unilm_arguments(cfg: VQKDTrainConfig, teacher_dim: int) -> dict:
    """The constructor arguments of unilm's ``VQKD`` that rebuild this model (``encoder_config`` /
    ``decoder_config`` override ``modeling_vqkd.get_model_default_params()``)."""
    d = cfg.dims()
    enc = dict(img_size=cfg.input_size, patch_size=cfg.patch_size, embed_dim=d["embed_dim"], depth=d["depth"],
               num_heads=d["num_heads"], mlp_ratio=d["mlp_ratio"], num_classes=0)
    dec = dict(img_size=cfg.grid[0], patch_size=1, in_chans=cfg.code_dim, embed_dim=d["decoder_embed_dim"],
               depth=d["decoder_depth"], num_heads=d["decoder_num_heads"], mlp_ratio=d["mlp_ratio"], num_classes=0)
    return dict(encoder_config=enc, decoder_config=dec, n_embed=cfg.vocab_size, embed_dim=cfg.code_dim,
                decay=cfg.ema_decay, process_type=cfg.process_type, decoder_out_dim=teacher_dim)


def write_tokenizer(model, cfg: VQKDTrainConfig, teacher, out: Path) -> Path:
    """``vqkd_unilm.pth`` (+ ``.json``) in unilm's layout and our ``vqkd.safetensors`` + ``.json``; returns our stem."""
    from beit.tokenizers.vqkd import VQKDTokenizer, convert_official_state_dict, infer_config
    sd = model.reference_state_dict()
    tmp = out / (UNILM_FILE + ".tmp")
    torch.save({"model": sd}, tmp)
    tmp.replace(out / UNILM_FILE)
    config = {**infer_config(sd, cfg.dims()["num_heads"]), "interpolation": cfg.interpolation,
              "process_type": cfg.process_type}
    tok = VQKDTokenizer(**config)
    tok.load_state_dict(convert_official_state_dict(sd))
    meta = {"kind": "vqkd", "config": config, "layout": "microsoft/unilm beit2 modeling_vqkd.VQKD state dict under "
            "'model'", "unilm": unilm_arguments(cfg, teacher.dim), "teacher": teacher.describe()}
    (out / UNILM_FILE).with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return tok.freeze().save(out / TOKENIZER_STEM)
