"""A SAELens transcoder file stored as an "sae-transcoder" entry (``lenslab sae import DIR SOURCE``).

``TranscoderImportJob`` is the runner's params object for an import (``sae.transcoder_pipeline``
dispatches it to ``make``): its store params are the layer, ``imported`` (the sha256 of the
weights, ``weights_tag``) and the full ``TranscoderConfig``. They are known from the file alone,
so importing the same files again is served from the store without booting the model, and a file
with other weights or settings gets another key. ``make`` boots the model, checks that block
``layer`` has an MLP and that its input and output are ``d_in`` and ``d_out`` wide, and stores the
weights as the file holds them (float32), with no metrics: like an imported SAE, an imported
transcoder is not evaluated on import. ``check_before_boot`` does what ``config.json`` allows first
(``sae.preflight``: the block count and d_model).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import ConfigError, ShapeError
from analysis.run import RunContext, Subject
from analysis.sources import Source
from analysis.store import Result
from sae.transcoder import Transcoder
from sae.transcoder_store import to_result


def weights_tag(tc: Transcoder) -> str:
    """The first 16 hex digits of the sha256 of the transcoder's weights (names, shapes, float32 bytes)."""
    digest = hashlib.sha256()
    for name in tc.weight_names:
        w = np.ascontiguousarray(getattr(tc, name).detach().cpu().float().numpy())
        digest.update(f"{name}:{list(w.shape)};".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()[:16]


def _width_error(d: Path, tc: Transcoder, label: str, d_in: int, d_out: int) -> ShapeError:
    c = tc.cfg
    return ShapeError(f"{d}: the transcoder maps d_in={c.d_in} -> d_out={c.d_out} but {label}'s block {c.layer} MLP "
                      f"maps {d_in} -> {d_out}; import it for the model it was trained on")


def check_before_boot(d: Path, tc: Transcoder, src: Source) -> None:
    """ConfigError when ``src``'s config.json gives it no block ``tc.cfg.layer``; ShapeError when its
    d_model is not the transcoder's d_in and d_out. Nothing is checked where config.json is silent."""
    from sae import preflight

    c = tc.cfg
    dims = preflight.config_dims(src.hf_dir)
    preflight.check_layer(dims, "mlp_in", c.layer,
                          fix=f"the transcoder in {d} reads {c.hook_in}: import it for the model it was trained on")
    width = preflight.site_width(dims, "mlp_in")
    if width is not None and (c.d_in, c.d_out) != (width, width):
        raise _width_error(d, tc, src.label, width, width)


@dataclass(frozen=True, eq=False, kw_only=True)
class TranscoderImportJob:
    """A transcoder read from a SAELens directory, to be checked against the model and stored."""

    transcoder: Transcoder
    tag: str  # weights_tag
    directory: str
    saelens_architecture: str
    source_spec: str | None = None

    def store_params(self) -> dict:
        from sae.requests import canonical

        return {"layer": int(self.transcoder.cfg.layer), "imported": self.tag,
                "transcoder": canonical(self.transcoder.cfg.to_dict())}

    def make(self, subject: Subject, ctx: RunContext) -> Result:
        """Boot the model, check the block's MLP widths on it, and the Result of the transcoder."""
        from sae import requests
        from sae.sites import check_site
        from sae.transcoder_job import harvest_pairs

        src, tc = subject.source, self.transcoder
        if src is None:
            raise ConfigError("an imported transcoder is checked against its model: pass a Source, not a fingerprint")
        layer = int(tc.cfg.layer)
        with ctx.lock:
            bridge = requests.booted(src, ctx)
            check_site(bridge, "mlp_in", layer)  # ConfigError listing the valid layers
            x, y = harvest_pairs(bridge, layer, ["the model"], max_tokens=8)
        if (x.shape[1], y.shape[1]) != (tc.cfg.d_in, tc.cfg.d_out):
            raise _width_error(Path(self.directory), tc, src.label, int(x.shape[1]), int(y.shape[1]))
        meta: dict[str, Any] = {"source_spec": self.source_spec, "source_label": src.label,
                                "imported_from": self.directory, "imported": self.tag,
                                "saelens_architecture": self.saelens_architecture}
        return to_result(tc, {}, [], meta=meta)


__all__ = ["TranscoderImportJob", "check_before_boot", "weights_tag"]
