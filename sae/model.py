"""``SAE``: a sparse autoencoder on flattened attention outputs (``hook_z``): relu, topk,
jumprelu, batchtopk, matryoshka_batchtopk or gated (``SAEConfig.architecture``).

Shapes (glossary: batch, d_in = n_heads*d_head, d_sae)::

    pre   = (x - b_dec) @ W_enc + b_enc          # [..., d_sae]
    f     = activation(pre)                        # sae.activations, one per architecture
    x_hat = f @ W_dec + b_dec                     # [..., d_in]

Parameters: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in] (rows unit norm), ``b_enc``
[d_sae], ``b_dec`` [d_in], all float32 (training may compute in bfloat16; the master weights
stay float32); plus ``threshold`` [d_sae] (jumprelu, batchtopk, matryoshka_batchtopk: the
inference threshold) or ``r_mag``, ``b_mag`` [d_sae] (gated, whose ``b_enc`` is the gate bias
SAELens calls ``b_gate``). ``weight_names`` lists them. Same names and layout as SAELens
(``sae.saelens_format``). ``encode(x)``, ``decode(f)`` and ``W_dec`` are the interface every
architecture shares.
"""

from __future__ import annotations

import torch
from torch import nn

from analysis.errors import ShapeError
from sae import activations
from sae.config import SAEConfig

BASE_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")
EXTRA_WEIGHTS = {"jumprelu": ("threshold",), "batchtopk": ("threshold",), "matryoshka_batchtopk": ("threshold",),
                 "gated": ("r_mag", "b_mag")}
TOPK_INIT = ("topk", "batchtopk", "matryoshka_batchtopk")  # encoder initialised at the decoder's scale


class SAE(nn.Module):
    """Sparse autoencoder with config ``cfg`` (``SAEConfig``).

    Initialisation (seeded by ``cfg.seed``): decoder rows uniform random directions (unit
    norm), encoder = decoder transposed (Conerly et al. 2024, Gao et al. 2024), scaled for relu
    by 2*d_in/d_sae (about half the latents fire at first; each adds (x.d_i) d_i, and
    sum over d_sae/2 random unit d_i of d_i d_i^T ~ (d_sae / 2 d_in) I, so x_hat ~ x at step 0),
    biases zero. ``train.train_sae`` sets ``b_dec`` to the activation mean when
    ``cfg.b_dec_init == "mean"``.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        scale = 1.0 if cfg.architecture in TOPK_INIT else min(1.0, 2.0 * cfg.d_in / cfg.d_sae)
        self.W_enc = nn.Parameter((w_dec.T * scale).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))
        elif "threshold" in self.weight_names:  # batchtopk: estimated in training (starts at 0, as SAELens)
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))
        elif cfg.architecture == "gated":
            self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
            self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    @property
    def weight_names(self) -> tuple[str, ...]:
        """Names of this architecture's tensors, as stored and as in SAELens (b_enc = gated's b_gate)."""
        return BASE_WEIGHTS + EXTRA_WEIGHTS.get(self.cfg.architecture, ())

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else f", l0={c.l0_coefficient:g}" if c.architecture == "jumprelu" \
            else f", l1={c.l1_coefficient:g}"
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook={c.hook_name}"

    # -- forward pieces -------------------------------------------------------------------
    def _check(self, x: torch.Tensor, width: int, what: str) -> None:
        if x.shape[-1] != width:
            raise ShapeError(f"SAE {what} has last dimension {x.shape[-1]} but this SAE expects {width} "
                             f"({self.cfg.hook_name}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}); "
                             "flatten hook_z to [..., n_heads*d_head] and use an SAE trained on that hook")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (x - b_dec) W_enc + b_enc. x: [..., d_in] -> [..., d_sae]."""
        self._check(x, self.cfg.d_in, "input")
        x = x.to(self.W_enc.dtype)
        return torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, self.cfg.d_in),
                           self.W_enc).reshape(*x.shape[:-1], self.cfg.d_sae)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's inference nonlinearity (``sae.activations``): ReLU; ReLU of the top-k
        entries per row (exactly k kept) for topk; ReLU above ``threshold`` for jumprelu, batchtopk and
        matryoshka_batchtopk; gate times magnitude for gated (``pre`` = the gate pre-activation)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return activations.relu(pre)
        if arch == "topk":
            return activations.topk(pre, self.cfg.k)
        if arch == "gated":
            return activations.gated(pre, self.b_enc, self.r_mag, self.b_mag)
        return activations.jumprelu(pre, self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations f. x: [..., d_in] -> f: [..., d_sae] (non-negative)."""
        return self.activate(self.pre_acts(x))

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK SAE only: (values [..., k] >= 0, indices [..., k]) of the kept latents."""
        if self.cfg.architecture != "topk":
            raise ShapeError(f"encode_topk needs a topk SAE; this one is {self.cfg.architecture}; use encode")
        values, indices = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat = f W_dec + b_dec. f: [..., d_sae] -> [..., d_in]."""
        self._check(f, self.cfg.d_sae, "feature tensor")
        f = f.to(self.W_dec.dtype)
        return torch.addmm(self.b_dec, f.reshape(-1, self.cfg.d_sae),
                           self.W_dec).reshape(*f.shape[:-1], self.cfg.d_in)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat from (values, indices) [..., k] without the dense [.., d_sae] product."""
        shape = values.shape[:-1]
        v = values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype)
        i = indices.reshape(-1, indices.shape[-1])
        out = torch.nn.functional.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum")
        return (out + self.b_dec).reshape(*shape, self.cfg.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> x_hat: [..., d_in]."""
        return self.decode(self.encode(x))

    # -- decoder norm constraint ----------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @staticmethod
    @torch.no_grad()
    def remove_parallel_grad_(w_dec: torch.Tensor, grad: torch.Tensor) -> None:
        """Remove from each row of ``grad`` [d_sae, d_in] its component along the (unit) row of
        ``w_dec``: g_i <- g_i - (g_i . w_i) w_i (Kissane et al.'s / Bricken et al.'s code)."""
        w = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad.sub_((grad * w).sum(dim=1, keepdim=True) * w)

    @property
    def n_heads(self) -> int | None:
        return self.cfg.n_heads

    @property
    def d_head(self) -> int | None:
        return self.cfg.d_head


def sae_on(sae: SAE, device: torch.device | str | None) -> SAE:
    """``sae`` itself when ``device`` is None or where it already is, else a copy moved there (a
    stored SAE stays on CPU while a run encodes on its device)."""
    if device is None or torch.device(device) == sae.W_enc.device:
        return sae
    import copy

    return copy.deepcopy(sae).to(device)
