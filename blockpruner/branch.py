"""One residual branch of a decoder layer, as every forward in the package runs it.

A block's contribution is dropout(post_norm(module(pre_norm(h)))), added to the residual
stream h by its caller: the search's skipping forward (`blocks.run_branch`), SliceGPT's
rotation, and the forwards of the pruned and sliced models all call `branch_output`, and
every replacement layer forward reads its arguments through `keyword_args`. The modeling
files shipped in exported directories must stand alone, so `modeling.pruned.modeling_source`
inlines this module's code into them: it imports nothing.
"""

LAYER_ARGS = ("attention_mask", "position_ids", "past_key_values")  # after the hidden states


def keyword_args(args: tuple, kwargs: dict) -> dict:
    """A decoder layer's positional arguments after the hidden states, as keywords
    (transformers 5 passes keywords; remote-code models may not)."""
    return dict(zip(LAYER_ARGS, args)) | kwargs if args else kwargs


def branch_output(layer, kind: str, hidden, kwargs: dict, pre_norm: str, module: str, post_norm: str | None = None,
                  dropout: str | None = None):
    """What block `kind` ("attn" or "mlp") of `layer` adds to the residual stream `hidden`, by
    the attribute names of its norms, module and dropout, exactly as the layer computes it."""
    x = getattr(layer, pre_norm)(hidden)
    if kind == "attn":
        x = getattr(layer, module)(hidden_states=x, **kwargs)
        if isinstance(x, tuple):  # (output, attention weights[, cache])
            x = x[0]
    else:
        x = getattr(layer, module)(x)
    if post_norm:
        x = getattr(layer, post_norm)(x)
    if dropout:
        x = getattr(layer, dropout)(x)
    return x
