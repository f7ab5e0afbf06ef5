import difflib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from project.errors import ConfigError


class Backbone(nn.Module):
    """Any timm model, or any torchvision classification model, by ``name``: a new head of ``num_outputs``, and a stem
    that takes the data's channels (timm's way for torchvision's too: a pretrained 3-channel stem's kernels summed for
    1 channel).

    ``pretrained`` loads the library's own weights: timm's from the Hugging Face Hub (cached under
    ``$HF_HOME``), torchvision's from download.pytorch.org (cached as ``$TORCH_HOME/hub/checkpoints/<file>``).
    ``weights`` is a local file of them instead (a state dict, ``.pth`` or ``.safetensors``: for timm, its
    pretrained-file override), loaded whatever ``pretrained`` says. Pretrained, the net carries the mean and std its
    weights were trained with (:attr:`pretrained_stats`), which the classifier normalises with in place of the data's.

    ``image_size`` resizes each batch (bilinear, on the device, inside the net: predict and export resize as training
    did) to the size the weights want; None keeps the data's size. ``options`` go to the model's constructor (timm's
    ``drop_rate``, ``drop_path_rate``...).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_outputs: int,
        name: str,
        library: str = "timm",
        pretrained: bool = False,
        weights: str | None = None,
        image_size: int | None = None,
        options: dict[str, Any] | None = None,
    ):
        super().__init__()
        if image_size is not None and image_size < 1:
            raise ConfigError(f"model.net.image_size={image_size}: give a size of 1 pixel or more, or null.")
        self.size = (image_size, image_size) if image_size else None
        # a str, not a Literal: jsonargparse would report a wrong one as a failure to parse the whole net
        if library not in ("timm", "torchvision"):
            raise ConfigError(f"model.net.library {library!r}: choose timm or torchvision.")
        weights = str(Path(weights).expanduser()) if weights else None
        if weights is not None and not Path(weights).is_file():
            what = "a directory" if Path(weights).is_dir() else "no such file"
            raise ConfigError(f"model.net.weights {weights}: {what}; give the file of the weights.")
        build = _timm if library == "timm" else _torchvision
        self.model, self.head_name, stats = build(
            name, in_shape[0], num_outputs, pretrained or weights is not None, weights, dict(options or {})
        )
        # one channel: the mean of the weights' per-channel statistics, as the summed stem sees a grey image
        self.pretrained_stats = tuple(_channels(s, in_shape[0]) for s in stats) if stats else None

    def get_classifier(self) -> nn.Module:
        """The head (timm's name for it): what fine-tuning trains while the body is frozen, and at the full rate."""
        return self.model.get_submodule(self.head_name)

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's depth from the stem (0) up, as timm groups its blocks for layer-wise learning-rate decay;
        empty for torchvision's models, which fine-tuning then layers by their order
        (:func:`project.finetune.layers`)."""
        matcher = getattr(self.model, "group_matcher", None)
        if matcher is None:
            return {}
        from timm.models import group_parameters

        groups = group_parameters(self.model, matcher(coarse=False))
        return {f"model.{n}": i for i, names in enumerate(groups.values()) for n in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:  # to the same size, bilinear is the identity
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model(x)


def _channels(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def _unknown(library: str, name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listing = "timm.list_models()" if library == "timm" else "torchvision.models.list_models(torchvision.models)"
    return ConfigError(f"model.net.name {name!r} is not a {library} model.{hint} The names: {listing}.")


def _offline(library: str, name: str, where: str, err: Exception) -> ConfigError:
    reason = " ".join(str(err).split())[:200].rstrip(".")
    return ConfigError(
        f"model.net {library} {name}: its pretrained weights come from {where}, and could not be fetched ({reason}). "
        "Where there is no internet, download that file elsewhere and give it: --model.net.init_args.weights PATH "
        "(or put it in that cache); or train from scratch with --model.net.init_args.pretrained false."
    )


def _timm(name, channels, outputs, pretrained, weights, options):
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=outputs, in_chans=channels,
                                  pretrained_cfg_overlay=overlay, **options)  # fmt: skip
    except TypeError as err:
        raise ConfigError(f"model.net.options {options} are not arguments of timm's {name}: {err}") from None
    except Exception as err:  # the Hub unreachable; or a file of another model, empty, corrupt (EOFError...)
        if weights:
            raise _bad_file(weights, name, err) from None
        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None)
        hub_page = f"the Hugging Face Hub, https://huggingface.co/{hub} (cached under $HF_HOME; HF_HUB_OFFLINE=1 "
        where = hub_page + "skips the retries)" if hub else getattr(cfg, "url", "") or "nowhere: timm has none"
        raise _offline("timm", name, where, err) from None
    stats = (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]) if pretrained else None
    head = next(n for n, m in model.named_modules() if m is model.get_classifier())
    return model, head, stats


def _torchvision(name, channels, outputs, pretrained, weights, options):
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise _unknown("torchvision", name, torchvision.models.list_models(module=torchvision.models))
    default = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        model = torchvision.models.get_model(name, weights=None if weights else default, **options)
    except TypeError as err:
        raise ConfigError(f"model.net.options {options} are not arguments of torchvision's {name}: {err}") from None
    except OSError as err:  # urllib's URLError: no network
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
        raise _offline("torchvision", name, f"{default.url} (cached as {cached})", err) from None
    if weights:
        try:
            model.load_state_dict(_state_dict(weights))
        except Exception as err:  # another model's, empty, corrupt, not a state dict
            raise _bad_file(weights, name, err) from None
    head = _replace_head(model, name, outputs)
    _adapt_stem(model, channels)
    stats = (default.transforms().mean, default.transforms().std) if pretrained else None
    return model, head, stats


def _state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _bad_file(path: str, name: str, err: Exception) -> ConfigError:
    # load_state_dict's first line only names the model: the keys missing, unexpected or of another size follow
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = " ".join(lines[:3])[:400].rstrip(".") if lines else type(err).__name__
    return ConfigError(f"model.net.weights {path} cannot be loaded into {name}: {reason}. Give a file of that "
                       "model's weights (a state dict, .pth or .safetensors).")  # fmt: skip


def _replace_head(model: nn.Module, name: str, outputs: int) -> str:
    """A new last linear layer of ``outputs``, and its name: torchvision's heads differ (fc, classifier.1,
    heads.head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"torchvision's {name} has no linear head to resize: choose another model.")
    path, old = found[-1]
    head = nn.Linear(old.in_features, outputs)
    parent = model.get_submodule(path.rpartition(".")[0])
    setattr(parent, path.rpartition(".")[2], head)
    return path


def _adapt_stem(model: nn.Module, channels: int) -> None:
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if stem.in_channels == channels:
        return
    from timm.models import adapt_input_conv

    stem.weight = nn.Parameter(adapt_input_conv(channels, stem.weight.detach()))
    stem.in_channels = channels
