"""Batches: the on-device transform (crop, flip, resize, normalize) and seeded index batches of a shard."""

import torch

from fed_app.task import batches as D
from fed_app.task.batches import BatchTransform


def test_batch_transform_crops_flips_resizes_and_normalizes():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    plain = BatchTransform(64, (0.5,) * 3, (0.25,) * 3)(images)
    assert plain.shape == (16, 3, 64, 64)
    ref = torch.nn.functional.interpolate(images.float() / 255, size=64, mode="bicubic").clamp(0, 1)
    assert torch.allclose(plain, (ref - 0.5) / 0.25, atol=1e-5)

    aug = BatchTransform(32, (0.0,) * 3, (1.0,) * 3, augment=True)
    out = aug(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    for i in range(16):  # each output is some crop of the padded image, possibly mirrored
        found = any(
            torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
            for dy in range(9) for dx in range(9)
            for crop in [padded[i, :, dy:dy + 32, dx:dx + 32]]
        )
        assert found
    again = aug(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_batch_stream_cycles_through_a_shard_with_a_seeded_order():
    idx = torch.arange(10, 20)
    stream = D.batch_stream(idx, 4, torch.Generator().manual_seed(0))
    first_pass = torch.cat([next(stream) for _ in range(3)])
    assert sorted(first_pass.tolist()) == list(range(10, 20))
    second_pass = torch.cat([next(stream) for _ in range(3)])
    assert sorted(second_pass.tolist()) == list(range(10, 20))
    assert not torch.equal(first_pass, second_pass)
