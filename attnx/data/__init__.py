"""Tasks, datasets, tokenizers and input pipelines.

Importing `attnx.data` imports none of the bundled TFDS builders (`dates`,
`number_words`, `digit_captions`, which pull in babel, num2words and
scikit-learn): `attnx.data.prepare` imports and so registers them when a
dataset is opened.
"""
