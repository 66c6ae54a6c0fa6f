"""Input pipeline: tf.data on the host producing numpy batches (NHWC float32, normalised).

Modules: `augment` (crop/flip/normalise/erase/eval resize), `randaugment` (timm policies),
`input_pipeline` (datasets, train/eval iterators), `demo` (the bundled scikit-learn digits
ImageFolder), `class_names` (the names stored with the weights). Mixup/cutmix run on device in
the train step (`debiformer_jax.mixup`).
"""
