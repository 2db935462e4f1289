"""`SourceCache`: decoding state that belongs to the source, not to a hypothesis.

A seq2seq model's `init_cache` keeps two kinds of state. Some of it changes
with every output token and differs between hypotheses: the Transformer's
self-attention keys and values, an RNN's hidden state, ConvS2S's convolution
buffers. The rest is computed once from the encoder and only read while
decoding: cross-attention keys and values, projected annotations, source
masks. A beam search copies the first kind from each survivor's parent at
every step; the second kind is the same in every beam of a source (the
encoder's output is tiled by the beam), so copying it is wasted memory
traffic, as large as the source side of the model.

Models declare the read-only kind as `SourceCache` (an `nnx.Cache`, so every
`nnx.Cache` filter still selects it); `attnx.decoding`'s beam search
reorders only the other caches.
"""

from flax import nnx


class SourceCache(nnx.Cache):
    """An `nnx.Cache` array `[batch, ...]` fixed for the whole decode of its source.

    The beam search never reorders it, which is exact only if every beam of a
    source holds the same value: write it in `init_cache` from the (tiled)
    encoder output and never in `decode_step`.
    """
