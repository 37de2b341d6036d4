"""Where σ comes from: MultiLayerAttentionMixer.sigma = 'token' | 'relation' | 'after_blocks'."""

import math

import pytest
import torch
from _mixer_parts import mixer_parts

from dfqkit.mixers import MultiLayerAttentionMixer
from dfqkit.mixers.sigma_readouts import SIGMA_READOUTS

CPU = torch.device("cpu")


def _parts(teacher, **kw):
    return mixer_parts(teacher, **{"mix_prob": 1.0, **kw})


def _with_classes(mixer, gen, sample, classes):
    """Run the mixer on ``sample`` with the drawn classes fixed to ``classes (b, c)``."""
    classes = torch.as_tensor(classes)
    mask = torch.ones_like(classes, dtype=torch.bool)
    mixer._draw_classes = lambda labels: (classes, mask)
    return mixer(sample.replace(labels=classes[:, 0]), gen)


@pytest.mark.parametrize("readout", SIGMA_READOUTS)
def test_sigma_is_a_positive_distribution_for_every_readout(teacher, readout):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, sigma=readout, classes_per_sample=4, mix_prob=0.5)
    sample = gen.sample(16, CPU)
    batch = mixer(sample, gen)
    sigma, mixed = batch.mix["sigma"], batch.mix["mixed"]
    assert mixed.any() and not mixed.all()  # both kinds in the batch
    torch.testing.assert_close(sigma.sum(-1), torch.ones(16))
    assert (sigma[mixed] > 0).all()  # every class drawn for a mixed sample takes part
    assert (sigma[~mixed, 0] == 1).all()  # an unmixed sample keeps its one-hot label
    torch.testing.assert_close(batch.targets.gather(1, batch.mix["classes"]), sigma)
    assert torch.equal(batch.labels[~mixed], sample.labels[~mixed])


def test_token_sigma_ratio_ignores_the_partner_relation_sigma_does_not(teacher):
    # With one head and one level σ is a single softmax whose logit for class k_i depends on
    # e_{k_i} alone (the query is the shared O^0), so σ_a / σ_b = exp(l_a - l_b) whatever the
    # other classes drawn are (Luce's choice axiom). Averaging several heads or levels breaks
    # the exact identity, hence heads = 1 and levels = 0 here.
    torch.manual_seed(0)
    gen, token = _parts(teacher, levels=0, heads=1, classes_per_sample=3)
    _, relation = _parts(teacher, levels=0, heads=1, classes_per_sample=3, sigma="relation")
    relation.load_state_dict(token.state_dict(), strict=False)  # same O^0, W, table
    with torch.no_grad():
        relation.o0.normal_()  # a query far from 0, so the token logits differ per class
        token.o0.copy_(relation.o0)
    sample = gen.sample(1, CPU)

    def ratio(mixer, third):
        s = _with_classes(mixer, gen, sample, [[0, 1, third]]).mix["sigma"][0]
        return (s[0] / s[1]).item()

    assert ratio(token, 2) == pytest.approx(ratio(token, 3), rel=1e-5)
    assert ratio(relation, 2) == pytest.approx(ratio(token, 2), rel=1e-5)  # R = 0 at start
    with torch.no_grad():
        relation.relation[0, 2] = 2.0  # class 0 gains next to class 2 ...
        relation.relation[0, 3] = -2.0  # ... and loses next to class 3
    # bias of class 0 = mean(R[0,1], R[0,x]) = ±1, of class 1 = mean(R[1,0], R[1,x]) = 0
    assert ratio(relation, 2) == pytest.approx(ratio(token, 2) * math.e, rel=1e-5)
    assert ratio(relation, 3) == pytest.approx(ratio(token, 3) / math.e, rel=1e-5)


def test_token_sigma_of_a_class_is_unchanged_by_an_equivalent_partner(teacher):
    # Classes 1 and 2 get the same embedding: under the token reading σ_0 next to 1 must equal
    # σ_0 next to 2 (any heads and levels); a relation bias R[0,1] != R[0,2] tells them apart.
    torch.manual_seed(0)
    gen, token = _parts(teacher, levels=0, classes_per_sample=2)
    _, relation = _parts(teacher, levels=0, classes_per_sample=2, sigma="relation")
    relation.load_state_dict(token.state_dict(), strict=False)
    with torch.no_grad():
        for m in (token, relation):
            m.table[0, 2] = m.table[0, 1]
        relation.relation[0, 1] = 1.5
    sample = gen.sample(1, CPU)
    token_1 = _with_classes(token, gen, sample, [[0, 1]]).mix["sigma"]
    token_2 = _with_classes(token, gen, sample, [[0, 2]]).mix["sigma"]
    assert torch.equal(token_1, token_2)
    rel_1 = _with_classes(relation, gen, sample, [[0, 1]]).mix["sigma"]
    rel_2 = _with_classes(relation, gen, sample, [[0, 2]]).mix["sigma"]
    torch.testing.assert_close(rel_2, token_2)  # R[0,2] = R[2,0] = 0: no bias
    assert rel_1[0, 0] > rel_2[0, 0] + 0.05  # R[0,1] = 1.5 lifts class 0 next to class 1


@pytest.mark.parametrize("blocks", [0, 1])
def test_after_blocks_sigma_changes_with_the_sample_noise_token_sigma_does_not(teacher, blocks):
    torch.manual_seed(0)
    kw = {"levels": 2, "classes_per_sample": 3, "blocks": blocks}
    gen, after = _parts(teacher, **kw, sigma="after_blocks")
    _, token = _parts(teacher, **kw)
    token.load_state_dict(after.state_dict())  # one parameter set, two readouts
    sample = gen.sample(1, CPU)
    other = sample.replace(z=torch.randn_like(sample.z))
    classes = [[0, 1, 2]]
    a1 = _with_classes(after, gen, sample, classes).mix["sigma"]
    a2 = _with_classes(after, gen, other, classes).mix["sigma"]
    t1 = _with_classes(token, gen, sample, classes).mix["sigma"]
    t2 = _with_classes(token, gen, other, classes).mix["sigma"]
    assert torch.equal(t1, t2)
    assert (a1 - a2).abs().max() > 1e-3
    # and on the classes it is mixed with: class 0's share moves when class 2 becomes 3
    a3 = _with_classes(after, gen, sample, [[0, 1, 3]]).mix["sigma"]
    assert (a1[0, 0] - a3[0, 0]).abs() > 1e-3


def _grads(mixer, gen, sample):
    mixer.zero_grad()
    batch = mixer(sample, gen)
    weights = torch.randn_like(batch.targets)
    (batch.targets * weights).sum().backward()  # a loss on the soft labels only
    return {n: p.grad for n, p in mixer.named_parameters()}


def test_the_soft_labels_train_the_new_parameters(teacher):
    torch.manual_seed(0)
    gen, relation = _parts(teacher, levels=0, classes_per_sample=4, sigma="relation")
    sample = gen.sample(8, CPU)
    grads = _grads(relation, gen, sample)
    assert grads["relation"] is not None and grads["relation"].abs().sum() > 0
    assert grads["o0"].abs().sum() > 0
    # after_blocks: the soft labels now reach the flow and the Transformer (token: they do not)
    _, after = _parts(teacher, levels=0, classes_per_sample=4, blocks=1, sigma="after_blocks")
    _, token = _parts(teacher, levels=0, classes_per_sample=4, blocks=1)
    for mixer, reached in ((after, True), (token, False)):
        grads = _grads(mixer, gen, sample)
        for part in ("transformer.", "flow."):
            got = [g for n, g in grads.items() if n.startswith(part) and g is not None]
            assert bool(got and sum(g.abs().sum() for g in got) > 0) is reached, part


def _old_forward(mixer, batch):
    """The token readout exactly as written before the ``sigma`` binding existed (a frozen copy
    of MultiLayerAttentionMixer._attend and forward): the default must stay bit-identical."""
    labels = batch.labels
    b = labels.shape[0]
    classes, mask = mixer._draw_classes(labels)
    tokens = mixer._table()[:, classes]
    j, b, c, d = tokens.shape
    h = mixer.heads
    dh = d // h
    q = torch.einsum("d,jde->je", mixer.o0, mixer.wq).view(j, 1, h, dh)
    k = torch.einsum("jbcd,jde->jbce", tokens, mixer.wk).view(j, b, c, h, dh)
    v = torch.einsum("jbcd,jde->jbce", tokens, mixer.wv).view(j, b, c, h, dh)
    logits = torch.einsum("jxhe,jbche->jbhc", q, k) / math.sqrt(dh)
    attn = logits.masked_fill(~mask[None, :, None, :], float("-inf")).softmax(-1)
    out = torch.einsum("jbhc,jbche->jbhe", attn, v).reshape(j, b, d)
    m = mixer.out_norm(mixer.o0 + torch.einsum("jbd,jde->jbe", out, mixer.wo))
    sigma = attn.mean(dim=(0, 2))
    m = m.transpose(0, 1)
    targets = torch.zeros(b, mixer.num_classes, dtype=sigma.dtype)
    targets = targets.scatter_add(1, classes, sigma)
    t, _ = mixer.flow(m, batch.z)
    g = mixer.transformer(t)
    return targets, mixer.to_cond(g)


def test_default_readout_is_bit_identical_to_the_token_code(teacher):
    torch.manual_seed(0)
    gen, default = _parts(teacher, levels=3, classes_per_sample=4, mix_prob=0.5)
    torch.manual_seed(0)
    _, token = _parts(teacher, levels=3, classes_per_sample=4, mix_prob=0.5, sigma="token")
    assert default.sigma == "token" and default.relation is None
    sd_default, sd_token = default.state_dict(), token.state_dict()
    assert sd_default.keys() == sd_token.keys()  # no new parameter: old checkpoints load
    assert all(torch.equal(sd_default[n], sd_token[n]) for n in sd_default)
    sample = gen.sample(8, CPU)
    torch.manual_seed(3)
    new = default(sample, gen)
    torch.manual_seed(3)
    targets, cond = _old_forward(default, sample)
    assert torch.equal(new.targets, targets) and torch.equal(new.cond, cond)


def test_bad_readouts_name_the_field():
    with pytest.raises(ValueError, match="sigma must be one of"):
        MultiLayerAttentionMixer(num_classes=10, sigma="O0")
    with pytest.raises(ValueError, match="sigma='relation' reads the mixer's attention"):
        MultiLayerAttentionMixer(num_classes=10, heads=0, sigma="relation")
