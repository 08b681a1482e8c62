"""ops.calibrate: the layer-by-layer stream against full forwards of the model."""

import pytest
import torch

from upcycle import hub
from upcycle.arch import FAMILIES, adapter_for
from upcycle.ops.calibrate import LayerStream, ffn_inputs, module_inputs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_stream_gives_every_layer_what_a_full_forward_gives_it(family):
    model = hub.tiny(family, layers=3)
    adapter = adapter_for(model)
    blocks = torch.randint(0, 256, (5, 12))
    full = ffn_inputs(model, blocks, [0, 1, 2], batch_size=2)
    stream = LayerStream(model, blocks, batch_size=2)
    for i in range(3):
        torch.testing.assert_close(stream.module_inputs(adapter.ffn(i)), full[i], rtol=1e-5, atol=1e-5)
        stream.advance()


def test_a_layer_changed_before_advancing_changes_what_the_next_one_sees():
    model = hub.tiny("llama", layers=3)
    adapter = adapter_for(model)
    blocks = torch.randint(0, 256, (4, 16))
    stream = LayerStream(model, blocks)
    before = stream.module_inputs(adapter.ffn(0))
    with torch.no_grad():
        adapter.ffn(0).down_proj.weight.mul_(3.0)  # as a conversion would change layer 0
    stream.advance()
    got = stream.module_inputs(adapter.ffn(1))
    want = module_inputs(model, {1: adapter.ffn(1)}, blocks, stop=True)[1]  # the changed model, from scratch
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ffn_inputs(hub.tiny("llama", layers=3), blocks, [1])[1], atol=1e-3)
    assert before.shape == got.shape == (4 * 16, model.config.hidden_size)
