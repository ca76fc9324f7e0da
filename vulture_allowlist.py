"""Names vulture (the dead-code check of .ci/run) cannot see used: each is called or read by a framework, not by
our code. `python -m vulture mae_transfer backbones tools harnesses tests vulture_allowlist.py --min-confidence 60`.
Regenerate the candidates with --make-whitelist; add a name here only with the framework that uses it."""

# Hooks and overrides the frameworks call: detectron2 HookBase / DetectionCheckpointer, mmengine Hook /
# optimizer constructors (registered by name), torch's nn.Module.extra_repr.
MaeLayerDecayOptimizerConstructor
_.add_params
_.extra_repr
_._torch_load
_.before_step
_.after_step
_.before_save_checkpoint
_.after_load_checkpoint
_.before_train
_.before_val
_.after_val
_.after_val_epoch
_.after_train_iter

# Parameters a framework's call signature requires (signal handlers, mmengine loaders and hooks).
signum
map_location
batch_idx
data_batch

# Attributes set for a framework to read (detectron2 Backbone fields, mmengine Runner / config fields, module
# stand-ins), and a dataclass field written to recipe.json.
_.__spec__
_.__getattr__
_._ext
_._out_features
_._out_feature_channels
_._out_feature_strides
_.num_features
_.gt_boxes
_.gt_classes
_._default_font_size
iteration_unit
_.load_from
_.experiment_name
_.dataloader_iterator

# Tests: pytest fixtures and hooks (used by name), framework config fields set in tests, unpacked constants.
no_stale_log_streams
one_thread
pytest_runtest_makereport
pytest_collectreport
pytest_sessionfinish
pytest_terminal_summary
_.window_block_indexes
HEIGHT
ieee_fp32
_.batch_size_per_image
_.post_nms_topk
exc
_.dataset_meta
_.simfp_2
__new__
_.dropout_ratio
pytestmark
noisy_kind
toy_kind
