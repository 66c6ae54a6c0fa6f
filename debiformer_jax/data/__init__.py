"""Input pipeline: tf.data on the host producing numpy batches (NHWC float32, normalised).

Modules: `augment` (crop/flip/normalise/erase/eval resize), `randaugment` (timm policies),
`mixup` (Mixup/CutMix in JAX, inside the train step), `input_pipeline` (datasets, configs,
train/eval iterators), `demo` (the bundled scikit-learn digits ImageFolder).
Nothing is imported here so that `mixup` can be used without importing TensorFlow.
"""
