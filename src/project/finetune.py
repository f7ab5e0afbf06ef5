"""Fine-tuning, as fastai and timm do it, from config: the body frozen for the first epochs while the head learns,
discriminative learning rates (the head at the optimizer's rate, the body at a fraction of it, or timm's layer-wise
decay), no weight decay on norms and biases, and weights transferred from a run of your own.

Not Lightning's ``BackboneFinetuning``: it adds the body's parameter groups to the optimizer when it unfreezes, which
breaks the LR finder (Lightning issue 14674), and it ignores ``train_bn`` while the body is frozen (Lightning issues
13902 and 21531). Here every parameter is in the optimizer from the first step, in groups fixed when the run starts;
a frozen parameter has no gradient, which torch's optimizers skip (no step, no weight decay, no momentum). Which
parameters are frozen follows from the epoch alone, so a run resumed across the unfreeze goes on exactly.
"""

from pathlib import Path

from torch import nn

from project import runs
from project.errors import ConfigError


def head_of(net: nn.Module) -> nn.Module:
    """The net's head: timm's ``get_classifier()``, or a ``head`` module (the template's own nets)."""
    if callable(getattr(net, "get_classifier", None)):
        return net.get_classifier()
    if isinstance(getattr(net, "head", None), nn.Module):
        return net.head
    raise ConfigError(
        f"model.net {type(net).__name__} has no head that fine-tuning could tell from its body: give it a `head` "
        "module (or timm's get_classifier()), or leave model.freeze_epochs, model.body_lr_scale and model.layer_decay "
        "unset."
    )


def layers(net: nn.Module) -> dict[str, int]:
    """Each parameter's depth from the stem (0) up: the net's own ``layer_ids()`` (a timm backbone's grouping of its
    blocks), or else its top-level modules in order, each child of a top-level ``Sequential`` a layer of its own; a
    wrapper that holds its whole net in one child (a torchvision :class:`~project.models.Backbone`) is looked into."""
    given = net.layer_ids() if callable(getattr(net, "layer_ids", None)) else {}
    if given:
        return given
    prefix, inner = "", net
    while not any(True for _ in inner.parameters(recurse=False)):
        holding = [(n, c) for n, c in inner.named_children() if next(c.parameters(), None) is not None]
        if len(holding) != 1:
            break
        prefix, inner = f"{prefix}{holding[0][0]}.", holding[0][1]
    order: dict[str, int] = {}
    depth = {}
    for name, _ in inner.named_parameters():
        parts = name.split(".")
        top = inner.get_submodule(parts[0]) if len(parts) > 1 else None
        key = ".".join(parts[:2]) if isinstance(top, nn.Sequential) and len(parts) > 2 else parts[0]
        depth[prefix + name] = order.setdefault(key, len(order))
    return depth


def param_groups(module: nn.Module, net: nn.Module, body_lr_scale: float, layer_decay: float | None,
                 norm_bias_decay: bool) -> list[dict]:  # fmt: skip
    """The optimizer's parameter groups of ``module`` (whose ``net`` attribute is ``net``): each with an ``lr_scale``
    (the head and anything outside the net 1; the body ``body_lr_scale``, times ``layer_decay`` per layer below the
    head), and ``weight_decay`` 0 for norms and biases unless ``norm_bias_decay``. One group where all is default."""
    fine = body_lr_scale != 1 or layer_decay is not None
    head = {id(p) for p in head_of(net).parameters()} if fine else set()
    depth = layers(net) if layer_decay is not None else {}
    heads = {n for n, p in net.named_parameters() if id(p) in head}
    top = max((d for n, d in depth.items() if n not in heads), default=0) + 1  # the head's layer
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in module.named_parameters():
        scale = 1.0
        if fine and name.startswith("net.") and id(param) not in head:
            scale = body_lr_scale * (layer_decay ** (top - depth[name[4:]]) if layer_decay is not None else 1)
        plain = not norm_bias_decay and param.ndim <= 1  # biases, norms' weights, class tokens' kind of vectors
        group = groups.setdefault((scale, plain), {"params": [], "lr_scale": scale})
        if plain:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return list(groups.values())


def scale_rates(optimizer) -> None:
    """Each group's rate, the optimizer's times its ``lr_scale``: before a scheduler reads the rates."""
    for group in optimizer.param_groups:
        group["lr"] *= group.pop("lr_scale", 1.0)


def freeze(net: nn.Module, frozen: bool, train_bn: bool) -> None:
    """The body frozen (no gradients; with ``train_bn``, its BatchNorm layers still learn and keep statistics, as
    fastai's ``train_bn``), or unfrozen; the head always trains."""
    head = {id(p) for p in head_of(net).parameters()}
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in bns if not any(id(p) in head for p in m.parameters())]
    learning = {id(p) for m in norms for p in m.parameters()} if train_bn else set()
    for norm in norms:
        norm.train(not frozen or train_bn)  # in eval, its running statistics stay the pretrained ones
    for param in net.parameters():
        param.requires_grad_(not frozen or id(param) in head or id(param) in learning)


def initialise(module: nn.Module, source: str) -> str:
    """Loads into ``module`` the net's weights and normalisation of a run of yours (its directory: the best
    checkpoint, else the newest; a directory of runs such as ``logs/<name>``: its newest run) or of a checkpoint file:
    every tensor whose name and shape match. Returns a line saying what was loaded and what was not (a head sized for
    other classes keeps its fresh weights)."""
    path = Path(source)
    if path.is_dir() and not (path / "config.yaml").is_file():  # a logger's directory of runs: its newest
        path = next(iter(runs.newest_first(path)), path)
    if path.is_dir():
        try:
            path = runs.checkpoint(path, "best")
        except ConfigError:
            path = runs.newest_checkpoint(runs.checkpoints_of(path)) or path
    if path.is_dir():
        raise ConfigError(f"model.init_from {source}: the directory holds no checkpoint; give a run that has trained.")
    if not path.exists():
        raise ConfigError(f"model.init_from {source}: no such run directory or checkpoint file.")
    try:
        checkpoint = runs.read_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    theirs = checkpoint["state_dict"]
    ours = {k: v for k, v in module.state_dict().items() if k.startswith(("net.", "normalize."))}
    # a head for other classes starts afresh, even where their number is the same
    classes = checkpoint.get("hyper_parameters", {}).get("classes")
    new_head = set()
    if classes is not None and list(classes) != list(module.hparams.classes):
        try:
            head = {id(p) for p in head_of(module.net).parameters()}
            new_head = {f"net.{n}" for n, p in module.net.named_parameters() if id(p) in head}
        except ConfigError:  # no head to tell: the shapes decide
            pass
    taken = {k: v for k, v in theirs.items()
             if k in ours and k not in new_head and tuple(v.shape) == tuple(ours[k].shape)}  # fmt: skip
    if not taken:
        raise ConfigError(f"model.init_from {path}: none of its tensors fits this model's net (another architecture?).")
    module.load_state_dict(taken, strict=False)
    left = [f"{k} {tuple(ours[k].shape)}" + (f" (it has {tuple(theirs[k].shape)})" if k in theirs and
                                               tuple(theirs[k].shape) != tuple(ours[k].shape) else "")
            for k in ours if k not in taken]  # fmt: skip
    line = f"model.init_from {path}: loaded {len(taken)} of {len(ours)} tensors"
    if left:
        line += f"; not loaded, trained from their fresh values: {', '.join(left)}"
    if new_head:
        line += (f" (a new head: the run's classes were {', '.join(map(str, classes))}; these are "
                 f"{', '.join(map(str, module.hparams.classes))})")  # fmt: skip
    return line + "."
