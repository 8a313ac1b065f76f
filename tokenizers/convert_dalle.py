"""Convert OpenAI's DALL-E dVAE pickles (encoder.pkl, decoder.pkl) to safetensors + JSON, once.

    python -m beit.tokenizers.convert_dalle --encoder encoder.pkl [--decoder decoder.pkl] \\
        --out weights/dalle --trust_pickle true

Unpickling runs code: the command refuses unless --trust_pickle is given. URLs are downloaded to
the cache first (--sha256 checks them). The output loads with load_tokenizer("dalle", OUT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from beit.checkpoints.safe_pickle import TRUST_PICKLE_HELP
from beit.config import field, parse_config
from beit.tokenizers.dalle import OFFICIAL_ENCODER_URL, convert_dalle_pickles, download


@dataclass
class ConvertDalleConfig:
    encoder: str = field("", help=f"encoder.pkl path or URL (official: {OFFICIAL_ENCODER_URL})")
    decoder: Optional[str] = field(None, help="decoder.pkl path or URL (optional; enables reconstructions)")
    out: str = field("weights/dalle", help="output directory (gets dalle.safetensors + dalle.json)")
    trust_pickle: bool = field(False, help="required: " + TRUST_PICKLE_HELP)
    input_size: int = field(112, help="tokenizer view size in px (grid = input_size / 8)")
    sha256: Optional[str] = field(None, help="expected sha256 of the encoder file (checked for URLs)")
    decoder_sha256: Optional[str] = field(None, help="expected sha256 of the decoder file (checked for URLs)")
    cache_dir: Optional[str] = field(None, help="download cache (default $BEIT_CACHE or ~/.cache/beit)")

    def validate(self) -> None:
        if not self.encoder:
            raise ValueError("--encoder is required (a local encoder.pkl or its URL)")


def _local(spec: Optional[str], sha: Optional[str], cache: Optional[str]):
    if spec and spec.startswith(("http://", "https://")):
        return download(spec, cache, sha)
    return spec


def convert(argv=None) -> int:
    cfg = parse_config(ConvertDalleConfig, argv, description=__doc__)
    if not cfg.trust_pickle:
        raise ValueError("refusing to unpickle: pass --trust_pickle true if you trust the files "
                         "(unpickling runs arbitrary code)")
    enc = _local(cfg.encoder, cfg.sha256, cfg.cache_dir)
    dec = _local(cfg.decoder, cfg.decoder_sha256, cfg.cache_dir)
    stem = convert_dalle_pickles(enc, dec, cfg.out, trust_pickle=True, input_size=cfg.input_size)
    print(f"wrote {stem}.safetensors and {stem}.json; use: load_tokenizer('dalle', '{stem}')")
    return 0


def main(argv=None) -> int:
    """``beit tokenizer convert-dalle``, as an exit code (beit.cli.call's policy)."""
    from beit.cli import call
    return call(convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
