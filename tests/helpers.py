import torch

import lo_ops

# 0-d, [1], odd, square, 3-d, 4-d conv, an empty tensor and a non-contiguous one (added by
# make_params); size-1 axes; a 5-d tensor; d0/d1 ahead of a long innermost axis.
SHAPES = [(), (1,), (5,), (7, 5), (6, 6), (3, 4, 6), (8, 3, 3, 3), (0, 5), (0,),
          (1, 1, 6), (1, 5, 4), (4, 1), (2, 3, 1, 4, 5), (40, 50, 32)]


def make_params(shapes, dtype=torch.float32, seed=0, non_contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    if non_contiguous:
        t = torch.randn(9, 4, generator=gen).to(dtype).t()  # [4, 9], non-contiguous
        params.append(torch.nn.Parameter(t))
        assert not params[-1].is_contiguous()
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(torch.empty_strided(p.shape, p.stride(), dtype=p.dtype))
        with torch.no_grad():
            q.copy_(p)
        out.append(q)
    return out


def set_grads(params_list, step, scale=0.1):
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen) * scale for p in params_list[0]]
    for params in params_list:
        for p, g in zip(params, grads):
            p.grad = g.to(p.device, p.dtype)


def make_opt(params, **kw):
    return lo_ops.SmallFCLOpt(params, **kw)


def make_state(params, gen):
    """Random accumulators for the ops' argument lists: momentum, rms, fac_row, fac_col, fac_diag."""
    from lo_ops._layout import state_shapes

    momentum, rms, fac_row, fac_col, fac_diag = [], [], [], [], []
    for p in params:
        s = state_shapes(p.shape)
        momentum.append(torch.randn(s["momentum"], generator=gen) * 0.1)
        rms.append(torch.rand(s["rms"], generator=gen))
        if p.dim() >= 2:
            fac_row.append(torch.rand(s["fac_row"], generator=gen))
            fac_col.append(torch.rand(s["fac_col"], generator=gen))
        else:
            fac_diag.append(torch.rand(s["fac_diag"], generator=gen))
    return momentum, rms, fac_row, fac_col, fac_diag


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self, backend):
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)
