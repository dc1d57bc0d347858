"""PyTorch backend (CPU or CUDA), through array-api-compat's torch namespace."""

from __future__ import annotations

import sys

from sdze_core.backend import Backend, host_peak_rss, reset_host_peak_rss, tree_flatten


class TorchBackend(Backend):
    """PyTorch. Threefry words are int64 masked to 32 bits (no uint32 add/shift
    on CPU). Native draws: a ``torch.Generator`` seeded with the key."""

    name = "torch"
    library = "torch"
    extra = "torch"
    native_uint32 = False

    def _load(self):
        import array_api_compat.torch as xp

        return xp

    @classmethod
    def owns(cls, x) -> bool:
        if "torch" not in sys.modules:
            return False
        import array_api_compat

        return array_api_compat.is_torch_array(x)

    def _resolve_device(self, device):
        import torch

        if device in ("gpu", "cuda"):
            device = "cuda"
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    "the torch backend was asked for CUDA, but torch finds no CUDA device"
                )
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _generator(self, key):
        import torch

        generator = torch.Generator(device=self.device)
        generator.manual_seed(key.hi << 32 | key.lo)
        return generator

    def _native_uniform(self, key, shape, dtype):
        import torch

        return torch.rand(shape, generator=self._generator(key), dtype=dtype, device=self.device)

    def _native_normal(self, key, shape, dtype):
        import torch

        return torch.randn(shape, generator=self._generator(key), dtype=dtype, device=self.device)

    def _native_rademacher(self, key, shape, dtype):
        import torch

        signs = torch.randint(0, 2, shape, generator=self._generator(key), device=self.device)
        return (1 - 2 * signs).to(dtype)

    def _native_integers(self, key, shape, low, high):
        import torch

        return torch.randint(low, high, shape, generator=self._generator(key), device=self.device)

    def to_host(self, x):
        return x.detach().cpu().numpy()

    def jit(self, fn, **options):
        import torch

        return torch.compile(fn, **options)

    def value_and_grad(self, fn):
        """Reverse mode by ``torch.autograd.grad`` on detached views of the leaves.

        The leaves are ``detach()``-ed views with ``requires_grad`` (the
        caller's tensors are left as they were: no grad tracking, no ``.grad``),
        so the graph lives only inside the call. Leaves ``fn`` does not use get
        zero gradients.
        """
        import torch

        def value_and_grad(params, *args):
            leaves, rebuild = tree_flatten(params)
            with torch.enable_grad():
                tracked = [leaf.detach().requires_grad_(True) for leaf in leaves]
                value = fn(rebuild(tracked), *args)
                if value.requires_grad:
                    grads = torch.autograd.grad(value, tracked, allow_unused=True)
                else:  # fn does not depend on the parameters
                    grads = [None] * len(tracked)
            grads = [
                torch.zeros_like(leaf) if g is None else g
                for leaf, g in zip(leaves, grads, strict=True)
            ]
            return value.detach(), rebuild(grads)

        return value_and_grad

    def hessian_diagonal(self, fn, x, index):
        """SDGD's PyTorch recipe: one gradient with ``create_graph`` and one more
        backward pass per sampled coordinate (V passes, each through a (B, d) graph)."""
        import torch

        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = fn(x)
            (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
            rows = []
            for j in index.tolist():
                (h,) = torch.autograd.grad(g[:, j].sum(), x, create_graph=True)
                rows.append(h[:, j])
        return u, torch.stack(rows)

    def matmul_into(self, a, b, out):
        import torch

        return torch.matmul(a, b, out=out)

    def multiply_into(self, a, b, out):
        import torch

        return torch.mul(a, b, out=out)

    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self, *arrays) -> None:
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)

    def peak_memory(self) -> int:
        if self._cuda():
            import torch

            return torch.cuda.max_memory_allocated(self.device)
        return host_peak_rss()

    def reset_peak_memory(self) -> None:
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_host_peak_rss()
