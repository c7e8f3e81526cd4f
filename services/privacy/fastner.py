"""spaCy's NER embedding network evaluated in one function instead of thinc's ~60 layers.

Why: on a short chat message en_core_web_sm's NER spends most of its time around the
arithmetic rather than in it. thinc calls a Python `forward` and builds a backprop closure
for each of the ~60 layers of the embedding network (hash embeddings, a maxout reduction,
four residual window-maxout-layernorm blocks, a linear projection); spaCy walks all of them
to set the dropout rate on every call; maxout takes its maximum over a trailing axis of 3,
which numpy does slowly; and the matrix products go through BLIS, which on this machine's
CPU runs a generic kernel at about a third of OpenBLAS's speed on these shapes
(docs/privacy.md has the figures). `fuse` replaces that embedding network, inside the
loaded pipeline, by one thinc node whose forward does the same arithmetic in a few dozen
numpy calls: numpy's BLAS (OpenBLAS, held to one thread: on 10-100 rows a second thread
costs more in hand-over than it saves), the maxout weights reordered piece-major so the
maximum is two `np.maximum` over contiguous blocks, the four hash tables laid end to end
for one gather. The projection into the parser's state features (`lower`) gets the same
BLAS. Everything else stays spaCy's: the tokenizer, the feature hashing and gathers (thinc's
own NumpyOps), the transition system and its greedy decoder; the weights are spaCy's,
reordered or laid end to end once at load (about 4 MB).

The arithmetic is the same but the BLAS's summation order is not, so the vectors differ in
the last float bits (about 1e-6); tests/unit/test_privacy_ner.py checks the vectors and
that the entities equal the stock pipeline's on a third of both labelled splits (all 1,280
messages were checked when this was written). A pipeline whose embedding network is not
laid out as this expects (another model or architecture) is left as it is: `fuse` returns
False and NER runs the stock way. Inference only: training through the fused node raises.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

# How the stock embedding network of spaCy's small English models is laid out (the chain's
# name spells out every layer); anything else is not fused.
_EMBED = (
    "extract_features>>list2ragged>>with_array("
    + "|".join(["ints-getitem>>hashembed"] * 4)
    + ")>>with_array(maxout>>layernorm>>dropout)>>ragged2list"
)
_BLOCK = "residual(expand_window>>maxout>>layernorm>>dropout)"
_LAYOUT = re.compile(
    rf"{re.escape(_EMBED)}>>with_array\((?:{re.escape(_BLOCK)}>>)+{re.escape(_BLOCK)}\)"
    r">>list2array>>linear"
)


@dataclasses.dataclass(frozen=True)
class _Maxout:
    """A maxout layer's weights as one (nO * nP, nI) matrix, then the layernorm after it."""

    weights: Any
    bias: Any
    pieces: int
    gain: Any
    shift: Any

    @classmethod
    def of(cls, maxout: Any, norm: Any) -> _Maxout:
        n_out, n_pieces, n_in = (maxout.get_dim(d) for d in ("nO", "nP", "nI"))
        # Piece-major rows (all units' first piece, then their second...): the maximum is
        # then taken over `pieces` contiguous blocks, where numpy's max over a trailing axis
        # of 3 cost more than the product itself.
        weights = maxout.get_param("W").transpose(1, 0, 2).reshape(n_pieces * n_out, n_in)
        bias = maxout.get_param("b").T.reshape(n_pieces * n_out)
        return cls(
            weights=np.ascontiguousarray(weights),
            bias=np.ascontiguousarray(bias),
            pieces=n_pieces,
            gain=norm.get_param("G"),
            shift=norm.get_param("b"),
        )

    def __call__(self, x: Any) -> Any:
        # thinc's Maxout then LayerNorm, the same arithmetic (numpy's `mean` and `var`
        # spelled out: they cost more in Python than in arithmetic here).
        y = x @ self.weights.T
        y += self.bias
        width = y.shape[1] // self.pieces
        best = y[:, :width].copy()
        for piece in range(1, self.pieces):
            np.maximum(best, y[:, piece * width : (piece + 1) * width], out=best)
        mean = np.add.reduce(best, axis=1, keepdims=True)
        mean /= width
        centred = best - mean
        var = np.add.reduce(centred * centred, axis=1, keepdims=True)
        var /= width
        var += 1e-08
        y = centred * var ** (-1.0 / 2.0)
        y *= self.gain
        y += self.shift
        return y


@dataclasses.dataclass(frozen=True)
class _Network:
    """The weights the fused forward reads, found in the stock layers."""

    columns: list[Any]
    table: Any  # the feature columns' embedding tables, end to end
    hashing: list[tuple[int, int, int]]  # (hash seed, table rows, first row) per column
    reduce: _Maxout
    blocks: list[tuple[int, _Maxout]]  # (window size, maxout + layernorm) per residual
    pad: int
    project: tuple[Any, Any]  # the linear layer's W, b


def _layers_named(model: Any, name: str) -> list[Any]:
    return [node for node in model.walk() if node.name == name]


def _network(chain: Any) -> _Network | None:
    """The stock network's weights, or None when `chain` is not laid out as expected."""
    if not _LAYOUT.fullmatch(chain.name) or len(chain.layers) != 3:
        return None
    tok2vec, _, linear = chain.layers
    embed, encoder = tok2vec.layers
    blocks = encoder.layers[0].layers
    hashembeds = _layers_named(embed, "hashembed")
    getitems = _layers_named(embed, "ints-getitem")
    reduce = _maxout_in(embed)
    parts = [(_layers_named(block, "expand_window"), _maxout_in(block)) for block in blocks]
    if (
        [g.attrs["index"][1] for g in getitems] != list(range(len(hashembeds)))
        or reduce is None
        or any(len(w) != 1 or m is None for w, m in parts)
    ):
        return None
    rows_of = [h.get_param("E").shape[0] for h in hashembeds]
    return _Network(
        columns=list(embed.layers[0].attrs["columns"]),
        table=np.concatenate([h.get_param("E") for h in hashembeds]),
        hashing=[
            (h.attrs["seed"], rows, sum(rows_of[:i]))
            for i, (h, rows) in enumerate(zip(hashembeds, rows_of, strict=True))
        ],
        reduce=reduce,
        blocks=[(w[0].attrs["window_size"], m) for w, m in parts if m is not None],
        pad=encoder.attrs["pad"],
        project=(linear.get_param("W"), linear.get_param("b")),
    )


def _maxout_in(model: Any) -> _Maxout | None:
    """The one maxout and the one layernorm in `model`, or None."""
    maxouts, norms = _layers_named(model, "maxout"), _layers_named(model, "layernorm")
    if len(maxouts) != 1 or len(norms) != 1:
        return None
    return _Maxout.of(maxouts[0], norms[0])


def fuse(nlp: Any, pipe: str = "ner") -> bool:
    """Replace `pipe`'s embedding network by the fused forward; False (and nothing changed)
    when the pipeline is not laid out as expected."""
    from thinc.api import Model, NumpyOps

    parser_model = nlp.get_pipe(pipe).model
    if parser_model.name != "parser_model" or not parser_model.layers:
        return False
    network = _network(parser_model.layers[0])
    if network is None:
        return False
    _one_blas_thread()
    ops = NumpyOps(use_blis=False)  # numpy's BLAS for the products

    def forward(model: Any, docs: list[Any], is_train: bool) -> tuple[Any, Any]:
        if is_train:
            raise NotImplementedError("the fused NER network is for inference only")
        return _forward(ops, network, docs), _no_backprop

    fused: Any = Model("fused_tok2vec", forward, ops=ops, dims={"nO": network.project[0].shape[0]})
    parser_model.layers[0] = fused
    parser_model.get_ref("lower").ops = ops
    return True


def _no_backprop(_: Any) -> Any:
    raise NotImplementedError("the fused NER network is for inference only")


def _forward(ops: Any, net: _Network, docs: list[Any]) -> Any:
    """Token vectors for every token of `docs`, one row each, as the stock chain makes them:
    hash embeddings of NORM, PREFIX, SUFFIX and SHAPE, a maxout reduction, residual
    window blocks over each doc padded apart, the linear projection."""
    features = [ops.asarray2i(doc.to_array(net.columns), dtype="uint64") for doc in docs]
    lengths = ops.asarray1i([len(f) for f in features])
    ids = ops.flatten(features)
    # One gather for every column: each row of `keys` holds one (token, column)'s hashes
    # into the tables laid end to end, so the rows come out as the columns side by side.
    keys = np.stack(
        [
            ops.hash(ops.as_contig(ids[:, i]), seed) % size + offset
            for i, (seed, size, offset) in enumerate(net.hashing)
        ],
        axis=1,
    )
    x = ops.gather_add(net.table, keys.reshape(-1, keys.shape[2])).reshape(len(ids), -1)
    x = net.reduce(x)
    # The encoder sees the docs apart, `pad` zero rows around each, so that no window reaches
    # into a neighbour (the padding rows change block by block, as in the stock layers).
    x = ops.flatten(ops.unflatten(x, lengths), pad=net.pad)
    for window, block in net.blocks:
        x = x + block(ops.seq2col(x, window))
    x = ops.flatten(ops.unflatten(x, lengths, pad=net.pad))
    weights, bias = net.project
    y = x @ weights.T
    y += bias
    return y


def _one_blas_thread() -> None:
    """Numpy's BLAS to one thread, process-wide: the fused products are 15-100 rows, where
    OpenBLAS's second thread made them ten times slower on 2 busy cores (docs/privacy.md).
    The privacy service runs no other numpy work that a second thread would help."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    threadpool_limits(limits=1, user_api="blas")
