"""Fine-tuning: timm and torchvision backbones loaded from weights files written here in the formats the libraries
read (never the network), the body frozen and unfrozen, parameter groups, transfer from a run of yours, export."""

import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from conftest import cli, fit_args, invoke
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from project import finetune
from project.errors import ConfigError
from project.models import Backbone, ConvNet
from project.module import ImageClassifier

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_weights_file_loads_into_the_body_and_the_head_is_rebuilt(tmp_path, suffix):
    pretrained = timm.create_model("resnet10t", num_classes=1000).state_dict()
    path = tmp_path / f"resnet10t{suffix}"
    save_file(pretrained, path) if suffix == ".safetensors" else torch.save(pretrained, path)
    net = Backbone((1, 28, 28), 5, "resnet10t", weights=str(path), image_size=32)
    ours = net.model.state_dict()
    assert ours["fc.weight"].shape == (5, 512) and not torch.equal(ours["fc.bias"], pretrained["fc.bias"][:5])
    # timm's way for one channel: the stem's kernels summed over red, green and blue
    assert torch.allclose(ours["conv1.0.weight"], pretrained["conv1.0.weight"].sum(1, keepdim=True))
    body = [k for k in pretrained if not k.startswith(("fc.", "conv1.0."))]
    assert body and all(torch.equal(ours[k], pretrained[k]) for k in body)
    assert net.pretrained_stats == tuple((sum(s) / 3,) for s in IMAGENET)  # grey: the mean of the channels'
    assert net(torch.zeros(2, 1, 28, 28, dtype=torch.float32)).shape == (2, 5)


@pytest.mark.slow
def test_torchvision_weights_come_from_its_hub_cache_or_a_file_and_train(tmp_path, monkeypatch, fashion_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    pretrained = torchvision.models.mobilenet_v3_small().state_dict()
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name  # torch.hub's name for the URL's file
    cached.parent.mkdir(parents=True)
    torch.save(pretrained, cached)
    for channels in (3, 1):
        net = Backbone((channels, 32, 32), 4, "mobilenet_v3_small", library="torchvision", pretrained=True)
        ours = net.model.state_dict()
        assert net.head_name == "classifier.3" and ours["classifier.3.weight"].shape == (4, 1024)
        stem = "features.0.0.weight"
        assert torch.allclose(ours[stem], pretrained[stem].sum(1, keepdim=True) if channels == 1 else pretrained[stem])
        assert all(torch.equal(ours[k], pretrained[k]) for k in pretrained if not k.startswith(("classifier.3", stem)))
        assert net.pretrained_stats[0] == (IMAGENET[0] if channels == 3 else (sum(IMAGENET[0]) / 3,))
    named = Backbone((3, 32, 32), 4, "mobilenet_v3_small", library="torchvision", weights=str(cached))
    assert torch.equal(named.model.state_dict()[stem], pretrained[stem]) and named.pretrained_stats is not None
    # layer-wise decay looks into the wrapper: the features' blocks in order, the classifier's layers after them
    depth = finetune.layers(named)
    first, block, last = (depth[f"model.{k}.weight"] for k in ("features.0.0", "features.12.0", "classifier.3"))
    assert first == 0 < block < last and len(set(depth.values())) > 10
    net = ["--model.net=project.models.Backbone", "--model.net.library=torchvision", "--model.net.pretrained=true",
           "--model.net.name=mobilenet_v3_small", "--model.net.image_size=32"]  # fmt: skip
    result = invoke(fit_args(tmp_path, fashion_dir, *net, "--model.freeze_epochs=1"))
    assert result.returncode == 0, result.stderr
    trained = torch.load(next(tmp_path.glob("logs/*/version_0/checkpoints/last.ckpt")), weights_only=True)
    assert trained["state_dict"]["net.model.classifier.3.weight"].shape == (10, 1024)
    assert torch.equal(trained["state_dict"]["normalize.mean"], torch.tensor([sum(IMAGENET[0]) / 3]))


def test_offline_without_a_file_says_where_the_weights_come_from(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for library, where in (("timm", "https://huggingface.co/timm/resnet18.a1_in1k"),
                           ("torchvision", f"cached as {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth")):  # fmt: skip
        with pytest.raises(ConfigError, match="could not be fetched") as err:
            Backbone((3, 32, 32), 2, "resnet18", library=library, pretrained=True)
        assert where in str(err.value) and "--model.net.init_args.weights PATH" in str(err.value)
    with pytest.raises(ConfigError, match="Did you mean resnet18"):
        Backbone((3, 32, 32), 2, "resnet81")
    empty = tmp_path / "empty.pth"
    empty.touch()
    for library in ("timm", "torchvision"):
        with pytest.raises(ConfigError, match=f"model.net.weights {empty} cannot be loaded into resnet18"):
            Backbone((3, 32, 32), 2, "resnet18", library=library, weights=str(empty))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), wrong)
    with pytest.raises(ConfigError, match=r"cannot be loaded into resnet18: Error.* Missing key.*: \"conv1.weight\""):
        Backbone((3, 32, 32), 2, "resnet18", library="torchvision", weights=str(wrong))
    with pytest.raises(ConfigError, match=f"model.net.weights {tmp_path}: a directory"):
        Backbone((3, 32, 32), 2, "resnet18", weights=str(tmp_path))
    # from the command line: the backbone's own message, one paragraph, exit 2
    cases = {"--model.net.name=resnt18": "is not a timm model. Did you mean resnet18",
             "--model.net.library=timmm": "choose timm or torchvision",
             "--model.layer_decay=0": "layer_decay=0.0: give a factor"}  # fmt: skip
    for flag, message in cases.items():
        flags = [flag] if "name" in flag else ["--model.net.name=resnet18", flag]
        result = invoke(["fit", "--model.net=project.models.Backbone", *flags])
        assert result.returncode == 2 and message in result.stderr and "larger images" not in result.stderr, flags
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


class Probe(Callback):
    """Per training epoch: whether the body's and the head's weights and the body's BatchNorm statistics moved."""

    def __init__(self):
        self.epochs = []

    def _watch(self, model):
        head = finetune.head_of(model.net)
        bn = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
        return [t.detach().clone() for t in (conv.weight, bn.running_mean, head.weight)]

    def on_train_epoch_start(self, trainer, model):
        self.before = self._watch(model)

    def on_train_epoch_end(self, trainer, model):
        self.epochs.append([not torch.equal(a, b) for a, b in zip(self.before, self._watch(model), strict=True)])


@pytest.mark.slow
def test_the_body_is_frozen_then_unfrozen_in_its_parameter_groups_and_exports(tmp_path, fashion_dir):
    probe = "--trainer.callbacks+=test_finetune.Probe"
    args = ["--model.net=project.models.Backbone", "--model.net.name=resnet10t", "--model.net.image_size=32",
            "--model.freeze_epochs=1", "--model.train_bn=false", "--model.body_lr_scale=0.1",
            "--model.layer_decay=0.5", "--model.norm_bias_decay=false", "--model.scheduler=null"]  # fmt: skip
    run = cli(fit_args(tmp_path, fashion_dir, "--trainer.max_epochs=2", *args, probe))
    probe = next(c for c in run.trainer.callbacks if isinstance(c, Probe))
    # epoch 0: only the head learns, the BatchNorm statistics stay; epoch 1: all of it
    assert probe.epochs == [[False, False, True], [True, True, True]]
    groups = run.trainer.optimizers[0].param_groups
    lr = run.model.optimizer.keywords["lr"]
    named = {id(p): n for n, p in run.model.named_parameters()}
    for group in groups:
        names = [named[id(p)] for p in group["params"]]
        head = all(n.startswith("net.model.fc.") for n in names)
        assert head or all(not n.startswith("net.model.fc.") for n in names)
        assert (group["lr"] == lr) == head and group["lr"] <= lr * (1 if head else 0.1 * 0.5)
        assert (group["weight_decay"] == 0) == all(run.model.get_parameter(n).ndim == 1 for n in names)
    assert len({g["lr"] for g in groups}) == 6  # the head, and 5 depths of the body: timm's stem and 4 stages
    # the exported graph resizes as the net does, and agrees with PyTorch on every test image it is checked on
    result = invoke(["export", str(tmp_path / "logs" / "fashion_mnist_cnn" / "version_0")])
    assert result.returncode == 0, result.stderr
    n = int(re.search(r"Parity on (\d+) test images", result.stdout).group(1))
    assert f"top-1 agreement {n}/{n}\n  model.pt2" in result.stdout and result.stdout.count(f"{n}/{n}") == 2


@pytest.mark.slow
def test_init_from_a_run_loads_the_body_and_rebuilds_a_head_for_other_classes(tmp_path, fashion_dir):
    assert invoke(fit_args(tmp_path, fashion_dir)).returncode == 0
    run = tmp_path / "logs" / "fashion_mnist_cnn" / "version_0"
    checkpoint = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    source = checkpoint["state_dict"]
    model = ImageClassifier(net=ConvNet, optimizer=torch.optim.SGD, scheduler=None, scheduler_interval="step",
                            in_shape=(1, 28, 28), classes=["a", "b", "c"], channels_last=False)  # fmt: skip
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    for given in (run, run.parent):  # a run, or the logger's directory of runs: its newest
        line = finetune.initialise(model, str(given))
        assert re.fullmatch(r"model.init_from .*best-epoch000.ckpt: loaded 20 of 22 tensors; not loaded, trained from "
                            r"their fresh values: net.head.1.weight \(3, 576\) \(it has \(10, 576\)\), net.head.1.bias "
                            r"\(3,\) \(it has \(10,\)\) \(a new head: the run's classes were T-shirt/top, .*, Boot; "
                            r"these are a, b, c\).", line)  # fmt: skip
    ours = model.state_dict()
    assert all(torch.equal(ours[k], source[k]) for k in ours if k.startswith(("net.features", "normalize")))
    assert all(torch.equal(ours[k], fresh[k]) for k in ("net.head.1.weight", "net.head.1.bias"))
    # as many classes, other ones: a new head all the same; the same classes: the head too
    names = checkpoint["hyper_parameters"]["classes"]
    for classes, loaded in ((list("abcdefghij"), "loaded 20 of 22"), (names, "loaded 22 of 22 tensors.")):
        ten = ImageClassifier(net=ConvNet, optimizer=torch.optim.SGD, scheduler=None, scheduler_interval="step",
                              in_shape=(1, 28, 28), classes=classes, channels_last=False)  # fmt: skip
        assert loaded in finetune.initialise(ten, str(run))
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        finetune.initialise(model, str(tmp_path))
    with pytest.raises(ConfigError, match="no such run directory or checkpoint file"):
        finetune.initialise(model, str(tmp_path / "nowhere"))
    # from the command line, into a binary task: the message, and a run that trains
    result = invoke(fit_args(tmp_path / "b", fashion_dir, f"--model.init_from={run}", "--data.positive_class=0"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("loaded 20 of 22 tensors; not loaded") == 1  # not again for the test after fit
    # the source is read when the run starts only: its later commands do without it
    run.rename(tmp_path / "moved")
    binary = tmp_path / "b" / "logs" / "fashion_mnist_cnn" / "version_0"
    for command in (["test", f"--config={binary / 'config.yaml'}", "--ckpt_path=last"],
                    ["resume", str(binary)]):  # fmt: skip
        result = invoke(command)
        assert result.returncode == 0 and "init_from" not in result.stdout + result.stderr, result.stderr


def test_a_net_without_a_head_cannot_be_frozen():
    with pytest.raises(ConfigError, match="has no head that fine-tuning could tell from its body"):
        ImageClassifier(net=lambda shape, n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, n)),
                        optimizer=torch.optim.SGD, scheduler=None, scheduler_interval="step", in_shape=(1, 28, 28),
                        classes=["a", "b", "c"], channels_last=False, freeze_epochs=1)  # fmt: skip
