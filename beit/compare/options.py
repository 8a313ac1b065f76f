"""Options of ``beit compare`` (``beit compare --help``)."""
from __future__ import annotations

from dataclasses import dataclass

from beit.compare import recipe, recipe_devices
from beit.config import field
from beit.options.common import TrackerOptions

SCRATCH_EPOCH_FACTORS = (1.0, 2.0)
DEFAULT_METHODS = ("beit", "scratch", "scratch_fitted", "linear_probe", "knn", "logreg_features", "logreg_pixels")
# opt-in: the MobileViT student taught by the fine-tuned BEiT model, and the same student on the labels alone
METHODS = DEFAULT_METHODS + ("distill", "student")
VIT_ONLY = ("linear_probe", "knn", "logreg_features")


@dataclass
class CompareConfig(TrackerOptions):
    # every stage (tokenizer fit, pretraining, each fine-tune) reports to these, as <run_name>/seed<N>/<stage>
    report_to: list[str] = field(default_factory=list)
    # data
    train_shards: str = field("", help="LABELLED training shards (a label subset of them is used, see label_fraction)")
    test_shards: str = field("", help="labelled held-out test shards: used for scoring only, never for any choice")
    unlabelled_shards: str = field("", help="shards for the tokenizer and pretraining (labels unused; empty: "
                                   "train_shards). Never the test shards")
    label_fraction: float = field(1.0, help="stratified fraction of the training labels each seed uses (per class, "
                                  "at least one image)")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="seeds (comma list); every stage is seeded")
    output_dir: str = field("runs/compare", help="work folder: one run folder per stage and seed, the results "
                            "(compare.json, compare.md, compare.png). A rerun reuses stages whose inputs are unchanged")
    # model and stages
    image_size: int = field(recipe.MODEL["image_size"], help="model input side in px")
    patch_size: int = field(recipe.MODEL["patch_size"], help="patch side in px (the tokenizer uses the same grid)")
    embed_dim: int = field(recipe.MODEL["embed_dim"], help="encoder width")
    depth: int = field(recipe.MODEL["depth"], help="encoder blocks")
    num_heads: int = field(recipe.MODEL["num_heads"], help="attention heads")
    arch: str = field("beit", help="encoder: beit (the ViT above) or a timm Swin name (swin_tiny_patch4_window7_224; "
                      "its sizes from --swin, the token cell is patch_size)")
    swin: dict = field(default_factory=dict, help="--arch swin_*: overrides of the Swin sizes (beit pretrain's swin "
                       f"options; default {recipe_devices.SWIN})")
    student: dict = field(default_factory=dict, help="distill / student: overrides of the student recipe (beit "
                          f"finetune options over the shared fine-tune recipe; default {recipe_devices.STUDENT})")
    distill: dict = field(default_factory=dict, help="distill: overrides of the distillation options (default "
                          f"{recipe_devices.DISTILL}); the teacher is the seed's fine-tuned BEiT model")
    tokenizer: str = field("kmeans", help="tokenizer kind; without tokenizer_path a k-means tokenizer is fitted "
                           "per seed on the unlabelled shards")
    tokenizer_path: str = field("", help="a saved tokenizer to use for every seed instead of fitting one")
    tokenizer_fit: dict = field(default_factory=dict, help="overrides of the k-means fit recipe "
                                f"(default {recipe.TOKENIZER})")
    pretrain: dict = field(default_factory=dict, help="overrides of the pretraining recipe (beit pretrain options; "
                           f"default {recipe.PRETRAIN})")
    finetune: dict = field(default_factory=dict, help="overrides of the shared fine-tune recipe (beit finetune "
                           f"options; default {recipe.FINETUNE})")
    linear_probe: dict = field(default_factory=dict, help="overrides of the linear probe recipe "
                                                          f"({recipe.LINEAR_PROBE})")
    # the fitted scratch recipe
    scratch_fit: str = field("train_loss", help="how the scratch model's own recipe is chosen among the epoch "
                             "factors: train_loss (the shortest whose final training loss reaches the BEiT "
                             "fine-tune's; the validation split instead when that loss is within noise of the "
                             "label-smoothing floor) or val (best top-1 on a validation split carved from the label "
                             "subset, then retrained on all of it). Never on the test split")
    scratch_epoch_factors: list[float] = field(default_factory=lambda: list(SCRATCH_EPOCH_FACTORS),
                                               help="candidate fine-tune lengths for scratch_fitted, x the shared "
                                               "epochs (by default " + " and ".join(
                                                   str(round(recipe.FINETUNE["epochs"] * f))
                                                   for f in SCRATCH_EPOCH_FACTORS) + " epochs)")
    scratch_max_factor: float = field(0.0, help="scratch_fitted: the ladder's budget, x the shared epochs. When no "
                                      "length of scratch_epoch_factors reaches BEiT's training loss, the length "
                                      "doubles up to this (0: no further lengths); a row that still reaches none is "
                                      "marked under-fitted at its longest length in compare.md")
    val_fraction: float = field(0.2, help="scratch_fit val: fraction of the label subset held out for the choice")
    # features
    knn_k: int = field(20, help="neighbours of the kNN classifier (and of the pretraining health metric)")
    health_knn: bool = field(True, help="log the online kNN health metric during pretraining (label subset as memory "
                             "bank, test shards scored: monitoring only)")
    threads: int = field(0, help="torch intra-op threads (0: torch's default, or the cores shared out over jobs; 1 "
                         "is fastest for tiny models on a busy CPU)")
    jobs: int = field(1, help="seeds run at once, each in its own process (the same numbers as one after another; "
                      "use up to one per core for tiny models)")
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), help=f"methods to run, of "
                               f"{list(METHODS)} (default {list(DEFAULT_METHODS)})")

    def validate(self) -> None:
        self.trackers()
        if not self.train_shards or not self.test_shards:
            raise ValueError("set --train_shards (labelled) and --test_shards (labelled, held out), e.g. "
                             "--train_shards 'shards/digits/train-*.tar' --test_shards 'shards/digits/test-*.tar'")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not self.seeds:
            raise ValueError("give at least one seed (--seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"each seed once, got {self.seeds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        from beit.modeling.backbones import backbone_for
        from beit.modeling.backbones.swin import timm_kwargs
        if self.arch not in ("beit",) and not self.arch.startswith("swin"):
            raise ValueError("--arch must be beit or a timm Swin name (swin_tiny_patch4_window7_224), got "
                             f"{self.arch!r}")
        if not backbone_for(self.arch, pretraining=True).linear_probe:
            vit_only = sorted(set(self.methods) & set(VIT_ONLY))
            if vit_only:
                raise ValueError(f"method(s) {vit_only} read ViT features and do not run with --arch {self.arch}; pass "
                                 "--methods beit,scratch,distill,student,logreg_pixels (or a subset)")
        timm_kwargs(self.swin)
        if "distill" in self.methods and "beit" not in self.methods:
            raise ValueError("method distill is taught by the seed's fine-tuned BEiT model: add beit to --methods")
        if self.scratch_fit not in ("train_loss", "val"):
            raise ValueError(f"scratch_fit must be train_loss or val, got {self.scratch_fit!r}")
        if not self.scratch_epoch_factors or min(self.scratch_epoch_factors) <= 0:
            raise ValueError(f"scratch_epoch_factors must be positive numbers, got {self.scratch_epoch_factors}")
        if self.scratch_max_factor < 0:
            raise ValueError(f"scratch_max_factor must be 0 (no further lengths) or a budget in x the shared epochs, "
                             f"got {self.scratch_max_factor}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.test_shards in (self.unlabelled_shards, self.train_shards):
            raise ValueError("the test shards must not be the training or unlabelled shards")

    @property
    def tracking(self) -> dict:
        """The stages' tracker options (beit.compare.stages.stage_tracking)."""
        from pathlib import Path
        return {"report_to": self.report_to, "run_name": self.run_name or Path(self.output_dir).resolve().name,
                "root": self.output_dir}

    @property
    def model(self) -> dict:
        """The encoder's options as beit pretrain takes them (the ViT's dims, or --arch and the Swin's sizes)."""
        if self.arch != "beit":
            return dict(image_size=self.image_size, patch_size=self.patch_size, arch=self.arch,
                        **{**recipe_devices.SWIN, **self.swin})
        return dict(image_size=self.image_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads)
