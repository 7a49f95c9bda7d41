"""The named presets of :class:`~ecomaug.config.TrainConfig` (``--preset``), and what the CPU ones cost.

A preset is a set of field values applied over the dataclass defaults and under the flags
(:func:`ecomaug.config.resolve_config`). The defaults are MoCo v2 ResNet-50 at 224 px, batch 256:
a GPU recipe. On a CPU or on a few hundred images, ``finetune`` (pretrained Lite0) or ``sample``
is the start that fits; :func:`ecomaug.engine.setup.plan_run` says so, with the figures below.
"""

from __future__ import annotations

from typing import Any

# Presets override the defaults; flags override presets.
PRESETS: dict[str, dict[str, Any]] = {
    # The bundled sample on a CPU: ~30 s on 2 cores. keep_last = 1: a 70-step demo needs one
    # checkpoint to resume from, not three of 138 MB.
    # m = 0.99: with m = 0.999 the key encoder barely moves in a run of ~100 steps.
    # bn_splits = 1: at batch 32 ghost-BN splits of 8 cost held-out recall (bench.moco_reference:
    # 0.890 vs 0.918 at 300 steps; mocov2 500 steps: clean R@1 0.770 vs 0.860) and a third of the time.
    "sample": dict(model="resnet18", crop_size=64, batch_size=32, epochs=10, queue_size=256, momentum=0.99,
                   hidden_dim=512, base_lr=0.3, warmup_epochs=1.0, log_every=5, checkpoint_every=20,
                   knn_every=5, shuffle_buffer=256, channels_last=False, bn_splits=1, keep_last=1),
    # MoCo v2 ResNet-50 on 8 V100s: 2048 images per step, fp16 with a gradient scaler.
    "v100x8": dict(model="resnet50", crop_size=224, batch_size=256, epochs=200, queue_size=65536,
                   amp="fp16", channels_last=True, compile=False, opt="sgd", base_lr=0.03,
                   warmup_epochs=10.0, checkpoint_every=1000),
    # Fine-tuning ImageNet weights on your listings: 558 steps (~20 min on 2 CPU cores) on 3,000 images.
    # Measured on bench.robustness (docs/finetune.md): with BN re-estimated on
    # augmented batches, no head warm-up and one LR for all, a fine-tune lost colour recall against the
    # frozen weights (0.955 vs 0.977); freeze_bn + a 60-step head warm-up + the backbone at 0.1 of the
    # head's LR gained on every disturbance. T 0.1, K 1024, m 0.99 and the head size were set once,
    # not ablated; crop 128 keeps a step near 1 s on 2 cores. Listing positives (docs/finetune.md, 1,000
    # items x 3 photos): P 1.0 with same-item keys masked lifted other-photo R@1 0.834 -> 0.859 and left
    # the whole-image disturbances level (0.672 vs 0.674); without item_id in the shards they do nothing.
    # Exported at 224 px (the weights' own input size; trained on 128 px crops): all disturbed 0.729 vs
    # 0.682 at 128 (whole image), 0.861 vs 0.845 with item regions; still +0.091 / +0.080 over the frozen
    # start at 224 (docs/finetune.md). export_multiscale: embedded at 224 and at its 128 px training side, the two
    # descriptors averaged: 0.870 with item regions (0.861 at 224 alone); 9 epochs or 160 px crops did not do better.
    "finetune": dict(model="tf_efficientnet_lite0", pretrained=True, crop_size=128, batch_size=32, epochs=6,
                     queue_size=1024, momentum=0.99, temperature=0.1, hidden_dim=1024, base_lr=0.3,
                     warmup_epochs=0.5, freeze_bn=True, head_warmup_steps=60, backbone_lr_scale=0.1,
                     log_every=10, checkpoint_every=200, knn_every=2, shuffle_buffer=512, channels_last=False,
                     bn_splits=1, listing_positives=1.0, mask_same_item=True, export_size=224,
                     export_multiscale=True),
    # One or more H100s: bf16 (no scaler), compiled encoders, a larger per-device batch.
    "h100": dict(model="resnet50", crop_size=224, batch_size=512, epochs=200, queue_size=65536,
                 amp="bf16", channels_last=True, compile=True, opt="sgd", base_lr=0.03,
                 warmup_epochs=10.0, checkpoint_every=1000),
}

# Seconds per optimizer step on a CPU, measured with Trainer.step on the bundled sample (median of 5
# steps after one warm-up; torch 1 thread, so the figure is one core's and does not depend on what
# else the machine runs): finetune 1.77 s, sample 0.53 s. Two idle cores take about 0.6x that (the
# finetune preset is ~1 s/step on 2 cores). MoCo v2 ResNet-50 at 224 px, the dataclass default,
# took 13.7 s of one core per 32 images: ~0.43 s an image, so a default step of 256 is ~2 min.
CPU_SECONDS_PER_STEP = {"finetune": 1.8, "sample": 0.5}
CPU_SECONDS_PER_RESNET50_IMAGE = 0.43
# The presets that fit a CPU and a few hundred images, in the order they are recommended.
CPU_PRESETS = ("finetune", "sample")
