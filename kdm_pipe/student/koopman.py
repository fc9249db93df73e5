"""Koopman operators C acting on the flattened latent: dense (affine / linear) or decomposed K = P Λ P⁻¹.

Sampling needs torch alone (scipy only for the spectrum prior's matching): `kdm-pipe export` copies this file into
exported pipelines."""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

OperatorKind = Literal["affine", "linear", "decomposed"]
SpectrumPrior = Literal["none", "uniform", "gradual", "circle"]


def _unit_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def spectrum_target(prior: SpectrumPrior, dim: int, seed: int) -> Tensor:
    """Fixed eigenvalue targets u as a real (dim, 2) tensor of (Re, Im), drawn from a generator seeded by `seed`.

    "uniform": u uniform in the square [−1, 1]²; "gradual": the first ⌈dim/2⌉ with radius in [0.9, 1], the rest in
    [0, 0.5], angles uniform; "circle": u = 1 (the official "on the circle" loss is mean|λ − 1|).
    """
    g = torch.Generator().manual_seed(seed)
    if prior == "uniform":
        return torch.rand(dim, 2, generator=g) * 2 - 1
    if prior == "gradual":
        high = (dim + 1) // 2
        lo = torch.cat([torch.full((high,), 0.9), torch.zeros(dim - high)])
        hi = torch.cat([torch.ones(high), torch.full((dim - high,), 0.5)])
        radius = lo + (hi - lo) * torch.rand(dim, generator=g)
        angle = 2 * math.pi * torch.rand(dim, generator=g)
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    if prior == "circle":
        return torch.tensor([1.0, 0.0]).expand(dim, 2).clone()
    raise ValueError(f"unknown spectrum prior {prior!r}; expected one of {get_args(SpectrumPrior)}")


def eigvals(matrix: Tensor) -> Tensor:
    """torch.linalg.eigvals, or NaN eigenvalues for a matrix with a non-finite entry: LAPACK is not safe on one (a
    diverged run's probe died with a segfault in it)."""
    if not bool(torch.isfinite(matrix).all()):
        nan = torch.full(matrix.shape[:-1], math.nan, dtype=matrix.dtype, device=matrix.device)
        return torch.complex(nan, nan)
    return torch.linalg.eigvals(matrix)


def matched_targets(lam: Tensor, targets: Tensor) -> Tensor:
    """`targets` (d, 2) reordered so that row j is the target of λ_j under the one-to-one matching of least total
    distance Σ_j |λ_j − u_π(j)| (the Hungarian algorithm, on detached values: the matching is piecewise constant)."""
    if bool((targets == targets[:1]).all()) or not bool(torch.isfinite(torch.view_as_real(lam)).all()):
        return targets                      # one target for all ("circle"), or nothing to match (a diverged run)
    # Imported here: `kdm-pipe export` copies this module into pipelines that need torch alone to sample.
    from scipy.optimize import linear_sum_assignment
    u = targets.detach().cpu().double()
    lam = lam.detach().cpu().to(torch.complex128)
    cost = (lam[:, None] - torch.complex(u[:, 0], u[:, 1])[None, :]).abs().numpy()
    _, cols = linear_sum_assignment(cost)
    return targets[torch.as_tensor(cols, device=targets.device)]


class DecomposedOperator(nn.Module):
    """K = P Λ P⁻¹ with d complex eigenvalues, as in the official KDM code.

    Convention: P = P_re + i·P_im and P⁻¹ = P_inv_re + i·P_inv_im are complex d×d matrices, i.e. the real 2d×2d
    blocks [[Re, −Im], [Im, Re]]; Λ = diag(λ_1..λ_d) with λ_j = exp(−exp(ν_j))·exp(i·exp(θ_j)), so |λ_j| < 1.
    P_re and P_im are each row-normalised at every use; P⁻¹ is free and tied to P only by `inverse_loss`.
    Applying the blocks to [z, 0] and keeping the first d entries gives z → Re(P Λ P⁻¹ z); we compute that with
    d×d products on (Re, Im) pairs, which is the same maths at a quarter of the block cost.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        scale = 1 / math.sqrt(2 * dim)
        # QR returns column-major factors; row-major like every other weight, so that the products below (whose last
        # bits depend on the layout) are the same wherever the weights are loaded, e.g. in an exported pipeline.
        self.P_re = nn.Parameter((torch.linalg.qr(torch.randn(dim, dim))[0] * scale).contiguous())
        self.P_im = nn.Parameter((torch.linalg.qr(torch.randn(dim, dim))[0] * scale).contiguous())
        self.P_inv_re = nn.Parameter(torch.randn(dim, dim) * scale)
        self.P_inv_im = nn.Parameter(torch.randn(dim, dim) * scale)
        # |λ| = √u₁ spreads the initial eigenvalues uniformly over the unit disk, phases uniform in [0, 2π);
        # clamping keeps ν, θ finite.
        u1, u2 = torch.rand(2, dim).clamp(1e-6, 1 - 1e-6)
        self.nu = nn.Parameter(torch.log(-0.5 * torch.log(u1)))
        self.theta = nn.Parameter(torch.log(2 * math.pi * u2))

    def eigen_parts(self, tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """(Re λ^τ, Im λ^τ), each (dim,): λ^τ = exp(τ·log λ) = exp(−τ·exp(ν))·exp(i·τ·exp(θ)), so that
        λ^a λ^b = λ^(a+b), λ^1 = λ and λ^0 = 1."""
        modulus, phase = torch.exp(-tau * torch.exp(self.nu)), tau * torch.exp(self.theta)
        return modulus * torch.cos(phase), modulus * torch.sin(phase)

    def inverse_loss(self) -> Tensor:
        """MSE(P⁻¹P, I) + MSE(PP⁻¹, I) on the real 2d×2d blocks.

        A block's squared error is twice the complex one over four times as many entries, hence the ½.
        """
        P = torch.complex(_unit_rows(self.P_re), _unit_rows(self.P_im))
        P_inv = torch.complex(self.P_inv_re, self.P_inv_im)
        eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        return 0.5 * ((P_inv @ P - eye).abs().square().mean() + (P @ P_inv - eye).abs().square().mean())

    def forward(self, z: Tensor, tau: float = 1.0) -> Tensor:
        """K(τ) z = Re(P Λ^τ P⁻¹ z); τ = 1 is K."""
        P_re, P_im = _unit_rows(self.P_re), _unit_rows(self.P_im)
        lam_re, lam_im = self.eigen_parts(tau)
        w_re, w_im = z @ self.P_inv_re.T, z @ self.P_inv_im.T                            # P⁻¹ [z, 0]
        w_re, w_im = lam_re * w_re - lam_im * w_im, lam_im * w_re + lam_re * w_im      # Λ
        return w_re @ P_re.T - w_im @ P_im.T                                           # Re(P ·)


class KoopmanOperator(nn.Module):
    """The student's linear step ẑ_0 = C z_T [+ B y] on flattened latents z of shape (B, dim).

    kind "affine": Linear(dim, dim) with bias (official default); "linear": bias-free; "decomposed": see
    `DecomposedOperator`. label_dim > 0 adds the Koopman control B y with B = Linear(label_dim, dim), bias
    included as in the official code.

    A spectrum prior adds the regulariser mean_j |λ_j − u_j| with u from `spectrum_target`, on either form: for the
    decomposed form its parameterised λ_j (λ_j always meets u_j); for the dense forms λ = torch.linalg.eigvals(weight)
    (differentiable), each λ meeting the target of a minimum-cost one-to-one matching (`matched_targets`). The
    official code pairs them in the order eigvals returns them, which LAPACK does not keep from one step to the next:
    measured on an 8×8 operator, Adam on that loss does not converge (uniform prior 1.01 → 0.94 after 600 steps,
    oscillating), while the matched loss is a function of the spectrum alone and decreases. For "circle" every target
    is 1 and both are the same. As in the official code the decomposed form's inverse loss
    MSE(P⁻¹P, I) + MSE(PP⁻¹, I) is added only together with a spectrum prior; without one, P⁻¹ is a free matrix
    and the applied map Re(P Λ P⁻¹ z) is just another parameterisation of a dense linear map.
    """

    def __init__(self, dim: int, kind: OperatorKind = "affine", label_dim: int = 0,
                 spectrum_prior: SpectrumPrior = "none", prior_seed: int = 0, intervals: int = 1) -> None:
        super().__init__()
        if kind not in get_args(OperatorKind):
            raise ValueError(f"unknown operator kind {kind!r}; expected one of {get_args(OperatorKind)}")
        if spectrum_prior not in get_args(SpectrumPrior):
            raise ValueError(f"unknown spectrum prior {spectrum_prior!r}; expected one of {get_args(SpectrumPrior)}")
        self.dim, self.kind, self.label_dim, self.spectrum_prior = dim, kind, label_dim, spectrum_prior
        self.intervals = 1 if kind == "decomposed" else intervals
        self.op = DecomposedOperator(dim) if kind == "decomposed" else nn.Linear(dim, dim, bias=kind == "affine")
        self.control = nn.Linear(label_dim, dim) if label_dim > 0 else None
        if spectrum_prior != "none":
            self.register_buffer("prior_target", spectrum_target(spectrum_prior, dim, prior_seed))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if (labels is None) != (self.control is None):
            raise ValueError(f"labels must be given exactly when label_dim > 0 (label_dim={self.label_dim})")
        z_hat = self.op(z)
        if self.control is not None:
            z_hat = z_hat + self.control(labels.to(z_hat.dtype))
        return z_hat

    def carry(self, z: Tensor, tau: float, labels: Tensor | None = None) -> Tensor:
        """K(τ) z: the latent carried over the fraction τ ∈ [0, 1] of the flow (τ = 1: x_T → x_0, one step).

        One operator serves every time: the decomposed form takes fractional powers K(τ) = P Λ^τ P⁻¹; a dense
        form is the operator C of one of `intervals` equal intervals, K(τ) = C^(τ·intervals) (τ·intervals must be
        whole). With one interval, K(1) is exactly forward(); the control B y is added only on a whole carry
        (trajectory supervision refuses labelled pairs: where B y enters along the way is not defined)."""
        if tau == 1 and self.intervals == 1:
            return self(z, labels)
        if self.control is not None:
            raise ValueError("carrying a conditional operator over part of the flow is not supported")
        if isinstance(self.op, DecomposedOperator):
            return self.op(z, tau)
        n = round(tau * self.intervals)
        if abs(n - tau * self.intervals) > 1e-6:
            raise ValueError(f"τ = {tau} is not a whole number of the operator's {self.intervals} intervals")
        for _ in range(n):
            z = self.op(z)
        return z

    def regularizer(self) -> dict[str, Tensor]:
        """Loss terms the operator asks for: {} without a spectrum prior; with one, {"spectrum"} for the dense
        forms and {"inverse", "spectrum"} for the decomposed one."""
        if self.spectrum_prior == "none":
            return {}
        u = self.prior_target
        if isinstance(self.op, DecomposedOperator):
            lam_re, lam_im = self.op.eigen_parts()
            return {"inverse": self.op.inverse_loss(),
                    "spectrum": torch.hypot(lam_re - u[:, 0], lam_im - u[:, 1]).mean()}
        lam = eigvals(self.op.weight)
        u = matched_targets(lam.detach(), u)
        return {"spectrum": torch.hypot(lam.real - u[:, 0], lam.imag - u[:, 1]).mean()}

    def eigenvalues(self) -> Tensor:
        """Complex (dim,) eigenvalues of the one-step map K(1): eigvals of the dense weight (to the power
        `intervals`: a trajectory-supervised C is one interval), or the parameterised λ of the decomposed form.

        For the decomposed form λ are the eigenvalues of the complex P Λ P⁻¹ only once P⁻¹ is P's inverse; the
        real map z → Re(P Λ P⁻¹ z) that is applied has other eigenvalues in general.
        """
        if isinstance(self.op, DecomposedOperator):
            return torch.complex(*self.op.eigen_parts())
        return eigvals(self.op.weight) ** self.intervals

    def matrix(self) -> Tensor:
        """The real (dim, dim) K(1) with carry(z, 1) = z K(1)ᵀ (+ the bias carried along, + control): the dense
        weight to the power `intervals`."""
        if isinstance(self.op, DecomposedOperator):
            eye = torch.eye(self.dim, dtype=self.op.nu.dtype, device=self.op.nu.device)
            return self.op(eye).T
        return torch.linalg.matrix_power(self.op.weight, self.intervals)
