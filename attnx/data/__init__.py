# Importing the bundled TFDS builders registers 'dates', 'number_words' and
# 'digit_captions' with TFDS (tfds.builder / tfds.data_source find them by name).
from attnx.data import dates, digit_captions, number_words  # noqa: F401
