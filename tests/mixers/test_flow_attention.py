import pytest
import torch

from dfqkit.mixers import AffineCouplingFlow, FlowLevelAttention, LevelTransformer


def _randomize(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_flow_is_invertible(dim):
    flow = AffineCouplingFlow(dim, steps=3)
    _randomize(flow)
    z = torch.randn(16, dim)
    u, _ = flow(z)
    assert not torch.allclose(u, z)
    torch.testing.assert_close(flow.inverse(u), z, rtol=1e-5, atol=1e-5)


def test_flow_log_determinant_matches_the_jacobian():
    flow = AffineCouplingFlow(4, steps=2)
    _randomize(flow)
    z = torch.randn(4, dtype=torch.float32)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z)
    _, logdet = flow(z[None])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac).logabsdet, rtol=1e-4, atol=1e-4)


def test_flow_starts_as_identity():
    z = torch.randn(3, 6)
    torch.testing.assert_close(AffineCouplingFlow(6, steps=2)(z)[0], z)


def test_flow_attention_weights_levels_per_sample():
    att = FlowLevelAttention(levels=3, dim=8, heads=2, flow_steps=2)
    m = torch.randn(5, 3, 8)
    t, alpha = att(m, torch.randn(5, 8))
    assert t.shape == (5, 3, 8) and alpha.shape == (5, 2, 3)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5, 2))
    # the same tokens with different noise get different level weights
    _, alpha2 = att(m, torch.randn(5, 8))
    assert not torch.allclose(alpha, alpha2)


def test_level_transformer_pools_tokens():
    tr = LevelTransformer(dim=8, heads=2, blocks=2)
    assert len(tr.encoder.layers) == 2
    assert tr(torch.randn(4, 3, 8)).shape == (4, 8)
