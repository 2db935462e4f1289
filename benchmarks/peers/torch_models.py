"""The four cpu-small architectures in idiomatic PyTorch (the peers of attnx's models).

Each model maps a batch to logits; `LossModule` wraps one with its training
loss (masked cross-entropy, plus the doubly stochastic attention term for the
captioner), which is what `torch_step` times, eager or under `torch.compile`.

  Transformer  nn.TransformerEncoder / nn.TransformerDecoder, post-LN (no
               final LayerNorm), one embedding table shared by source, target and
               the output projection, sinusoidal positions (Vaswani et al. 2017)
  RNNSearch    BiLSTM encoder, LSTM decoder with Bahdanau additive attention from
               s_{i-1}, s_0 = tanh(W_s h<-_1), maxout deep output (Bahdanau et al.
               2014, appendix A) - the same equations as attnx's `BahdanauDecoder`
  ConvS2S      GLU blocks with weight normalisation, multi-step attention in every
               decoder block (keys z, values z + e, fairseq's sqrt(0.5) scalings,
               encoder-gradient scaling) (Gehring et al. 2017)
  Captioner    CNN to an 8 x 8 x 128 grid, LSTM with additive spatial attention,
               gate beta_t, deep output (Xu et al. 2015)

Shapes: tokens are int64 `[batch, length]` (pad 0); images float32
`[batch, 1, H, W]` (NCHW, PyTorch's layout).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD = 0
SQRT_HALF = math.sqrt(0.5)


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """`[length, dim]`: sin on even channels, cos on odd ones (Vaswani et al. sec. 3.5)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


class Transformer(nn.Module):
    """Post-LN encoder-decoder; `forward(src [b, s], tgt_in [b, t]) -> logits [b, t, vocab]`."""

    def __init__(
        self,
        vocab: int,
        d_model: int,
        heads: int,
        d_ff: int,
        layers: int,
        dropout: float,
        max_length: int = 512,
        **_: object,
    ):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.embedding = nn.Embedding(vocab, d_model, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)  # unit-variance after * sqrt(d)
        self.register_buffer("positions", sinusoids(max_length, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

        def encoder_layer() -> nn.Module:
            return nn.TransformerEncoderLayer(
                d_model, heads, d_ff, dropout, batch_first=True, norm_first=False
            )

        def decoder_layer() -> nn.Module:
            return nn.TransformerDecoderLayer(
                d_model, heads, d_ff, dropout, batch_first=True, norm_first=False
            )

        # No final LayerNorm (nn.Transformer adds one): post-LN blocks already end with
        # one, and the paper (and attnx) has none. enable_nested_tensor=False: nested
        # tensors only serve inference, and this times training.
        self.encoder = nn.TransformerEncoder(encoder_layer(), layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(decoder_layer(), layers)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) * self.scale + self.positions[: tokens.shape[1]]
        return self.dropout(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_pad = src == PAD  # PyTorch's key padding masks are True where a key is ignored
        length = tgt_in.shape[1]
        # Boolean like the padding masks (True = may not attend): one mask type, no conversion.
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt_in.device).triu(1)
        memory = self.encoder(self.embed(src), src_key_padding_mask=src_pad)
        y = self.decoder(
            self.embed(tgt_in),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_in == PAD,
            memory_key_padding_mask=src_pad,
        )
        return F.linear(y, self.embedding.weight)  # tied output projection


class AdditiveAttention(nn.Module):
    """e_j = v^T tanh(W q + U k_j), softmax over the valid keys (Bahdanau et al. eq. 6)."""

    def __init__(self, query_dim: int, key_dim: int, dim: int, key_bias: bool = False):
        super().__init__()
        self.query = nn.Linear(query_dim, dim, bias=False)
        self.key = nn.Linear(key_dim, dim, bias=key_bias)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(
        self,
        query: torch.Tensor,
        projected_keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query `[b, q]`, projected_keys `[b, s, a]` (= `self.key(keys)`, computed once per
        source), values `[b, s, v]`, valid `[b, s]` -> context `[b, v]`, weights `[b, s]`."""
        scores = self.score(torch.tanh(projected_keys + self.query(query)[:, None])).squeeze(-1)
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights[:, None], values).squeeze(1), weights


class RNNSearch(nn.Module):
    """`forward(src [b, s], src_lengths [b], tgt_in [b, t]) -> logits [b, t, vocab]`."""

    def __init__(
        self, vocab: int, embed: int, hidden: int, attention: int, maxout: int, **_: object
    ):
        super().__init__()
        self.hidden, self.maxout = hidden, maxout
        self.src_embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.tgt_embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.encoder = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(hidden, 2 * hidden)  # s_0 = tanh(W_s h<-_1): h and c
        self.attention = AdditiveAttention(hidden, 2 * hidden, attention)
        self.cell = nn.LSTMCell(embed + 2 * hidden, hidden)
        self.readout = nn.Linear(hidden + embed + 2 * hidden, 2 * maxout)
        self.output = nn.Linear(maxout, vocab)

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor
    ) -> torch.Tensor:
        packed = pack_padded_sequence(
            self.src_embedding(src), src_lengths, batch_first=True, enforce_sorted=False
        )
        annotations, (finals, _) = self.encoder(packed)
        annotations, _ = pad_packed_sequence(
            annotations, batch_first=True, total_length=src.shape[1]
        )
        h, c = torch.tanh(self.init_state(finals[1])).chunk(2, dim=-1)  # finals[1]: backward
        keys = self.attention.key(annotations)  # U h_j, once per source
        valid = src != PAD
        embedded = self.tgt_embedding(tgt_in)
        queries, contexts = [], []
        for i in range(tgt_in.shape[1]):
            context, _ = self.attention(h, keys, annotations, valid)
            queries.append(h)
            contexts.append(context)
            h, c = self.cell(torch.cat([embedded[:, i], context], dim=-1), (h, c))
        # The deep output does not feed back: all steps in one product.
        joined = torch.cat([torch.stack(queries, 1), embedded, torch.stack(contexts, 1)], dim=-1)
        pre = self.readout(joined)
        maxout = pre.view(*pre.shape[:-1], self.maxout, 2).amax(dim=-1)
        return self.output(maxout)


def _scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x forward; `scale` times the gradient backward (fairseq's GradMultiply)."""
    return x.detach() + scale * (x - x.detach())


class ConvS2SEncoder(nn.Module):
    def __init__(self, vocab, embed, channels, kernel, layers, dropout, max_length, grad_scale):
        super().__init__()
        self.grad_scale = grad_scale
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.positions = nn.Embedding(max_length, embed)
        self.dropout = nn.Dropout(dropout)
        self.project_in = weight_norm(nn.Linear(embed, channels))
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, 2 * channels, kernel, padding=kernel // 2))
            for _ in range(layers)
        )
        self.project_out = weight_norm(nn.Linear(channels, embed))

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """src `[b, s]` -> keys z `[b, s, e]`, values `[b, s, e]`, valid `[b, s]`."""
        valid = src != PAD
        e = self.dropout(self.embedding(src) + self.positions.weight[: src.shape[1]])
        x = self.project_in(e).transpose(1, 2)  # [b, channels, s]: Conv1d's layout
        keep = valid[:, None].to(x.dtype)
        for conv in self.convs:
            # Padding is zeroed before each conv so that it never leaks into real positions.
            x = (F.glu(conv(self.dropout(x * keep)), dim=1) + x) * SQRT_HALF
        z = self.project_out(x.transpose(1, 2)) * valid[..., None]
        z = _scale_gradient(z, self.grad_scale)
        return z, (z + e) * SQRT_HALF, valid


class ConvS2SDecoder(nn.Module):
    def __init__(self, vocab, embed, channels, kernel, layers, dropout, max_length):
        super().__init__()
        self.kernel = kernel
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.positions = nn.Embedding(max_length, embed)
        self.dropout = nn.Dropout(dropout)
        self.project_in = weight_norm(nn.Linear(embed, channels))
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, 2 * channels, kernel)) for _ in range(layers)
        )
        self.attention_in = nn.ModuleList(nn.Linear(channels, embed) for _ in range(layers))
        self.attention_out = nn.ModuleList(nn.Linear(embed, channels) for _ in range(layers))
        self.project_out = weight_norm(nn.Linear(channels, embed))
        self.output = weight_norm(nn.Linear(embed, vocab))

    def forward(self, tgt_in, keys, values, valid) -> torch.Tensor:
        """tgt_in `[b, t]`, the encoder's keys / values `[b, s, e]`, valid `[b, s]` -> logits."""
        g = self.dropout(self.embedding(tgt_in) + self.positions.weight[: tgt_in.shape[1]])
        x = self.project_in(g)  # [b, t, channels]
        keys_t = keys.transpose(1, 2)
        # c_i is scaled by m * sqrt(1 / m) = sqrt(m), m the source's length (sec. 3.4).
        context_scale = valid.sum(1, dtype=x.dtype).sqrt()[:, None, None]
        ignore = ~valid[:, None]
        for conv, attention_in, attention_out in zip(
            self.convs, self.attention_in, self.attention_out, strict=True
        ):
            residual = x
            h = F.pad(self.dropout(x).transpose(1, 2), (self.kernel - 1, 0))  # causal
            h = F.glu(conv(h), dim=1).transpose(1, 2)
            d = (attention_in(h) + g) * SQRT_HALF
            weights = torch.softmax(torch.bmm(d, keys_t).masked_fill(ignore, float("-inf")), -1)
            context = torch.bmm(weights, values) * context_scale
            x = ((attention_out(context) + h) * SQRT_HALF + residual) * SQRT_HALF
        return self.output(self.dropout(self.project_out(x)))


class ConvS2S(nn.Module):
    """`forward(src [b, s], tgt_in [b, t]) -> logits [b, t, vocab]`."""

    def __init__(
        self,
        vocab: int,
        embed: int,
        channels: int,
        kernel: int,
        encoder_layers: int,
        decoder_layers: int,
        dropout: float,
        max_length: int = 64,
        **_: object,
    ):
        super().__init__()
        self.encoder = ConvS2SEncoder(
            vocab, embed, channels, kernel, encoder_layers, dropout, max_length,
            grad_scale=1.0 / (2.0 * decoder_layers),
        )  # fmt: skip
        self.decoder = ConvS2SDecoder(
            vocab, embed, channels, kernel, decoder_layers, dropout, max_length
        )

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decoder(tgt_in, *self.encoder(src))


class Captioner(nn.Module):
    """`forward(images [b, 1, H, W], tgt_in [b, t]) -> (logits [b, t, vocab], alphas [b, t, L])`."""

    def __init__(
        self,
        vocab: int,
        conv: tuple[int, ...],
        hidden: int,
        embed: int,
        attention: int,
        **_: object,
    ):
        super().__init__()
        blocks, previous = [], 1
        for channels in conv:
            blocks += [nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = channels
        self.cnn = nn.Sequential(*blocks)
        self.init_state = nn.Linear(previous, 2 * hidden)  # f_init,h and f_init,c
        self.attention = AdditiveAttention(hidden, previous, attention, key_bias=True)
        self.gate = nn.Linear(hidden, 1)  # beta_t = sigmoid(f_beta(h_{t-1}))
        self.embedding = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.cell = nn.LSTMCell(embed + previous, hidden)
        self.out_hidden = nn.Linear(hidden, embed)  # deep output (eq. 7): L_h, L_z, L_o
        self.out_context = nn.Linear(previous, embed)
        self.output = nn.Linear(embed, vocab)

    def forward(
        self, images: torch.Tensor, tgt_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.cnn(images).flatten(2).transpose(1, 2)  # [b, L, C] annotation vectors
        h, c = torch.tanh(self.init_state(grid.mean(1))).chunk(2, dim=-1)
        keys = self.attention.key(grid)
        embedded = self.embedding(tgt_in)
        hiddens, contexts, alphas = [], [], []
        for t in range(tgt_in.shape[1]):
            context, alpha = self.attention(h, keys, grid)
            context = torch.sigmoid(self.gate(h)) * context
            h, c = self.cell(torch.cat([embedded[:, t], context], dim=-1), (h, c))
            hiddens.append(h)
            contexts.append(context)
            alphas.append(alpha)
        deep = embedded + self.out_hidden(torch.stack(hiddens, 1))
        deep = deep + self.out_context(torch.stack(contexts, 1))
        return self.output(deep), torch.stack(alphas, 1)


class LossModule(nn.Module):
    """A model and its training loss: `forward(*inputs, tgt_out) -> scalar loss`.

    Cross-entropy averaged over the non-pad target tokens; with `penalty > 0`
    (the captioner) plus penalty * sum_i (1 - sum_t alpha_ti)^2 averaged over
    the batch (Xu et al. eq. 14), the sum over t running over real tokens.
    """

    def __init__(self, model: nn.Module, penalty: float = 0.0):
        super().__init__()
        self.model, self.penalty = model, penalty

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        *inputs, tgt_out = batch
        out = self.model(*inputs)
        logits, alphas = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        if self.penalty and alphas is not None:
            attended = (alphas * (tgt_out != PAD)[..., None]).sum(1)  # [b, L]
            loss = loss + self.penalty * ((1.0 - attended) ** 2).sum(1).mean()
        return loss


ARCHITECTURES = {
    "transformer": Transformer,
    "rnn": RNNSearch,
    "convs2s": ConvS2S,
    "spatial": Captioner,
}


def build(model: str, setting: dict, batch: dict) -> tuple[LossModule, tuple[torch.Tensor, ...]]:
    """The loss module of `model` at `setting` and its inputs from a numpy `batch`
    (`benchmarks.peers.settings.make_batch`), in the order `LossModule` takes them."""
    net = ARCHITECTURES[model](**setting)
    tgt_in, tgt_out = torch.from_numpy(batch["tgt_in"]), torch.from_numpy(batch["tgt_out"])
    if model == "spatial":
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return LossModule(net, setting["penalty"]), (images, tgt_in, tgt_out)
    src = torch.from_numpy(batch["src"])
    if model == "rnn":
        lengths = (src != PAD).sum(1)  # pack_padded_sequence wants them on the CPU
        return LossModule(net), (src, lengths, tgt_in, tgt_out)
    return LossModule(net), (src, tgt_in, tgt_out)


def count_params(module: nn.Module) -> int:
    """Trainable parameters (weight norm's direction and gain both count, as in attnx)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
