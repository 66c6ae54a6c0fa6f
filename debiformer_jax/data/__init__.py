"""Input pipeline: tf.data on the host producing numpy batches (NHWC uint8 images).

Modules: `augment` (crop/flip/normalise/erasing box/eval resize), `randaugment` (timm
policies), `input_pipeline` (datasets, train/eval iterators), `demo` (the bundled scikit-learn
digits ImageFolder), `class_names` (the names stored with the weights). Normalisation, the
erasing fill (`debiformer_jax.device_augment`) and mixup/cutmix (`debiformer_jax.mixup`) run
on device in the steps.
"""
