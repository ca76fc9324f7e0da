# Pilot rows AI-AM (benchmarks/demo_pilot/README.md): the demo's config plus mmseg's PhotoMetricDistortion with the
# hue shifted over its whole circle (hue_delta=90 of OpenCV's 180), so that a shape's colour, random by design,
# cannot be learned by heart. Run with PILOT_CONFIG=benchmarks/demo_pilot/hue_config.py.
_base_ = ['../../configs/shapes_upernet_vit_tiny_cpu.py']

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale={{_base_.train_scale}}, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size={{_base_.crop_size}}, cat_max_ratio=0.9, ignore_index=255),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion', hue_delta=90),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
