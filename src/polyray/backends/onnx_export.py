"""Export a local model to ONNX once, keep the build on disk, and reuse it across restarts.

A build is a directory named after what determines its bytes: a hash of the weights and of the
files that shape the graph (``weights_digest``), the exporter (``EXPORTER``: our export format,
torch and onnxruntime versions) and the precision. A restart with the same weights finds the
directory and skips the export (seconds of torch tracing, plus calibration for int8); changed
weights or a new exporter get a new directory, never a stale graph.

Concurrent starts (several replicas on one host, two test workers) may build the same directory
at once. Each writes into its own temporary directory beside the final one and renames it into
place: a rename is atomic, so a reader sees either no build or a complete one, and the loser of
the race discards its copy and uses the winner's. ``meta.json`` records the graph file's size and
sha256, so a build damaged after the fact is detected, moved aside and rebuilt.

The graph holds the whole sentence-transformers pipeline after tokenization: the transformer,
the directory's pooling and (when configured) L2 normalization, so one ``run`` returns the final
vectors and nothing of the hidden states crosses back into Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyray.backends.cpu import int8_weight_bits
from polyray.errors import ModelLoadError
from polyray.registry.model_dir import ModelDir

log = logging.getLogger(__name__)

# Bump when the exported graph or the int8 recipe changes: old builds are then never reused.
EXPORT_FORMAT = 4
OPSET = 17
GRAPH_FILE = "model.onnx"
META_FILE = "meta.json"
# Files besides the weights that change the graph: the architecture and the pooling/normalize modules.
_GRAPH_FILES = ("config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def exporter_id() -> str:
    """What produced the graph: our export format and the exporter/quantizer versions."""
    import onnxruntime  # type: ignore[import-untyped]
    import torch

    return f"f{EXPORT_FORMAT}-torch{torch.__version__.split('+')[0]}-ort{onnxruntime.__version__}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(model_dir: ModelDir) -> str:
    """sha256 over the weight files and the files that shape the graph (pooling, normalization)."""
    digest = hashlib.sha256()
    weight_files = sorted(p for p in model_dir.transformer_path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if not weight_files:
        raise ModelLoadError(f"{model_dir.transformer_path} has no weight files to export")
    for path in weight_files:
        digest.update(path.name.encode() + b"\0" + _sha256_file(path).encode())
    for name in _GRAPH_FILES:
        for base in {model_dir.root, model_dir.transformer_path}:
            path = base / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
    digest.update(f"pooling={model_dir.pooling};normalize={model_dir.normalize}".encode())
    return digest.hexdigest()


def default_cache_root(configured: str | None = None) -> Path:
    """``<cache_dir>/onnx``; ``cache_dir`` None: ``~/.cache/polyray`` (``polyray.config`` has
    already put ``$POLYRAY_CACHE_DIR`` into the model's ``cache_dir`` when the file left it unset)."""
    root = configured or str(Path.home() / ".cache" / "polyray")
    return Path(root).expanduser() / "onnx"


@dataclass(frozen=True)
class Build:
    """A complete build on disk; ``reused`` says it came from the cache rather than this call."""

    directory: Path
    meta: dict[str, Any]
    reused: bool

    @property
    def graph_path(self) -> Path:
        return self.directory / GRAPH_FILE


def build_name(digest: str, precision: str, weight_bits: int = 8) -> str:
    """The build directory's name; an int8 build also names its weight bits (``backends.cpu``)."""
    tag = f"{precision}w{weight_bits}" if precision == "int8" else precision
    return f"{digest[:16]}-{exporter_id()}-{tag}"


def _valid(directory: Path, digest: str, precision: str, weight_bits: int = 8) -> dict[str, Any] | None:
    """The build's metadata when the directory holds exactly the build we want, else None."""
    try:
        meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
        graph = directory / GRAPH_FILE
        if (
            meta.get("weights_sha256") == digest
            and meta.get("precision") == precision
            and meta.get("exporter") == exporter_id()
            and (precision != "int8" or meta.get("weight_bits") == weight_bits)
            and graph.stat().st_size == meta.get("graph_bytes")
            and _sha256_file(graph) == meta.get("graph_sha256")
        ):
            return meta
    except (OSError, ValueError):
        pass
    return None


def ensure_build(
    model_dir: ModelDir,
    precision: str,
    cache_root: Path,
    calibration_ids: Sequence[Sequence[int]] = (),
    weight_bits: int | None = None,
) -> Build:
    """The build for ``model_dir`` at ``precision`` under ``cache_root``, exporting it if absent.

    ``calibration_ids`` (token ids) are needed for int8 only: SmoothQuant's activation ranges.
    ``weight_bits`` (int8: 7 or 8) None: what this CPU needs (``backends.cpu.int8_weight_bits``).
    """
    bits = weight_bits if weight_bits is not None else int8_weight_bits()
    digest = weights_digest(model_dir)
    final = cache_root / build_name(digest, precision, bits)
    meta = _valid(final, digest, precision, bits)
    if meta is not None:
        log.info("reusing ONNX build %s", final)
        return Build(final, meta, reused=True)
    # Another process may have published the build since the look above (it was absent then):
    # look again before calling the directory damaged, or we would delete a good build in use.
    if final.exists() and (meta := _valid(final, digest, precision, bits)) is not None:
        return Build(final, meta, reused=True)
    if final.exists():  # a damaged or foreign directory: move it aside, never build into it
        aside = final.with_name(f".broken-{final.name}-{os.getpid()}-{time.time_ns()}")
        log.warning("ONNX build %s is incomplete or does not match its metadata; rebuilding", final)
        with contextlib.suppress(OSError):  # another process may have moved it already
            final.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_root))
    try:
        started = time.perf_counter()
        extra = _export(model_dir, precision, tmp / GRAPH_FILE, calibration_ids, bits)
        graph = tmp / GRAPH_FILE
        meta = {
            "weights_sha256": digest,
            "precision": precision,
            "exporter": exporter_id(),
            "opset": OPSET,
            "model_root": str(model_dir.root),
            "pooling": model_dir.pooling,
            "normalize": model_dir.normalize,
            "graph_bytes": graph.stat().st_size,
            "graph_sha256": _sha256_file(graph),
            "build_s": round(time.perf_counter() - started, 3),
            **({"weight_bits": bits} if precision == "int8" else {}),
            **extra,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(final)
        except OSError:
            # Lost the race: another process renamed a complete build into place first.
            winner = _valid(final, digest, precision, bits)
            if winner is None:
                raise
            log.info("another process built %s first; using its build", final)
            return Build(final, winner, reused=True)
        log.info("exported %s build of %s to %s in %.1f s", precision, model_dir.root, final, meta["build_s"])
        return Build(final, meta, reused=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(
    model_dir: ModelDir, precision: str, out: Path, calibration_ids: Sequence[Sequence[int]], weight_bits: int
) -> dict[str, Any]:
    """Write the graph for ``precision`` to ``out``; returns facts for ``meta.json``."""
    if precision == "fp32":
        export_fp32(model_dir, out, load_export_model(model_dir))
        return {}
    if precision == "int8":
        from polyray.backends.quantize import SMOOTH_ALPHA, calibrate_and_smooth, per_token_width, quantize_int8

        if not calibration_ids:
            raise ModelLoadError("an int8 build needs calibration inputs")
        model = load_export_model(model_dir)
        num_smoothed = calibrate_and_smooth(model, calibration_ids, SMOOTH_ALPHA)
        smoothed = out.with_name("smoothed-fp32.onnx")
        export_fp32(model_dir, smoothed, model)
        num_per_tensor, num_per_token = quantize_int8(smoothed, out, per_token_width(model), weight_bits)
        smoothed.unlink()
        return {
            "int8_recipe": "SmoothQuant + per-tensor dynamic uint8 activations; per-token uint8 activations "
            f"for the FFN output; per-channel int8 weights ({weight_bits}-bit in the per-tensor layers)",
            "smooth_alpha": SMOOTH_ALPHA,
            "num_calibration_inputs": len(calibration_ids),
            "num_smoothed_linears": num_smoothed,
            "num_per_tensor_matmuls": num_per_tensor,
            "num_per_token_matmuls": num_per_token,
        }
    raise ModelLoadError(f"unknown precision {precision!r}")


def load_export_model(model_dir: ModelDir) -> Any:
    """The HF model with eager attention: its plain MatMul/Softmax graph is what ORT's fusions know.

    Local files only (``local_files_only``): a model directory never reaches a hub."""
    from transformers import AutoModel

    path = str(model_dir.transformer_path)
    try:
        return AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    except Exception as exc:  # any failure to load stops start-up with the path in the message
        raise ModelLoadError(f"cannot load the model in {path} for export: {exc}") from exc


def export_fp32(model_dir: ModelDir, out: Path, model: Any) -> None:
    """Trace ``model`` + pooling + normalization to ONNX with dynamic batch and sequence axes."""
    import torch
    import torch.nn.functional as F

    from polyray.backends.torch import pool

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pooled = pool(hidden, attention_mask, model_dir.pooling)
            return F.normalize(pooled, p=2, dim=1) if model_dir.normalize else pooled

    # Trace with a padded row: the mask path must be in the graph (an all-ones example lets the
    # attention code skip the mask, and a traced graph would then ignore padding for ever).
    ids = torch.tensor([[101, 7592, 2088, 1012, 102], [101, 7592, 102, 0, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python bools on shapes; the graph is checked after
        torch.onnx.export(
            Pipeline().eval(),
            (ids, mask),
            str(out),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
            do_constant_folding=True,
        )
