"""ImageNet weights for the backbones: read from a file or URI (or torchvision's weights for
ResNets), and loaded only when every tensor fits.

A file that does not fit (another architecture, a checkpoint of something else, a truncated copy)
is refused with what does not fit, key by key, and the backbone is left as it was: nothing is half
loaded.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn

from centernet_ray import storage
from centernet_ray.config import ModelConfig
from centernet_ray.errors import UserInputError
from centernet_ray.model.resnet import resnet_arch
from centernet_ray.torch_files import load_torch_file

log = logging.getLogger(__name__)

# resnet_trunk is nn.Sequential over torchvision's (conv1, bn1, relu, maxpool, layer1..4): a key's
# first name becomes its index there; torchvision's classifier (fc) has no place in it.
RESNET_TRUNK_NAMES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def load_resnet_imagenet(backbone: nn.Sequential, arch: str, source: str) -> None:
    """Load ImageNet weights into a ``resnet_trunk`` of ``arch`` ("resnet18", ...): a file, local or a
    URI (a torchvision-style state dict), or a torchvision weights name such as ``IMAGENET1K_V1``."""
    if storage.names_a_weights_file(source):
        state = read_state_dict(source, f"{arch} weights")
    else:
        state = torchvision_weights(arch, source).get_state_dict(progress=False)
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in RESNET_TRUNK_NAMES:
            renamed[f"{RESNET_TRUNK_NAMES.index(head)}.{rest}"] = value
    load_fitting(backbone, renamed, f"{source} does not fit {arch} (expected torchvision's {arch} weights; "
                 "model.pretrained=null trains from scratch)", _torchvision_resnet_key)
    log.info("loaded pretrained %s backbone weights from %s", arch, source)


def _torchvision_resnet_key(key: str) -> str:
    """A ``resnet_trunk`` key as torchvision names it: ``4.0.conv1.weight`` -> ``layer1.0.conv1.weight``."""
    index, _, rest = key.partition(".")
    return f"{RESNET_TRUNK_NAMES[int(index)]}.{rest}"


def torchvision_weights(arch: str, name: str) -> torchvision.models.WeightsEnum:
    """torchvision's ImageNet weights of ``arch`` called ``name`` (``IMAGENET1K_V1``, ``DEFAULT``, ...),
    without downloading them."""
    try:
        return torchvision.models.get_model_weights(arch)[name] if name != "DEFAULT" \
            else torchvision.models.get_model_weights(arch).DEFAULT
    except KeyError as exc:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
        raise UserInputError(f"model.pretrained={name!r} is neither an existing file nor a torchvision "
                             f"weights name for {arch} ({names}, DEFAULT)") from exc


def check_weights_name(config: ModelConfig) -> None:
    """Refuse a ``model.pretrained`` that is a name (not a path) the backbone has no weights of:
    torchvision's names for ResNets; DLA-34 takes a file only. Downloads nothing."""
    if config.backbone == "dla34":
        raise UserInputError(f"model.pretrained={config.pretrained!r}: dla34 loads the DLA authors' ImageNet weights "
                             "from a file (a path to a copy of dla34-ba72cf86.pth), not a torchvision weights name")
    torchvision_weights(resnet_arch(config.backbone), config.pretrained)


def load_dla34_imagenet(trunk: nn.Module, path: str) -> None:
    """Load the DLA authors' ImageNet weights (a copy of ``dla34-ba72cf86.pth``, local or a URI) into
    a ``DLA34`` trunk.

    Accepts a bare state dict or ``{"state_dict": ...}``, with or without a "module." prefix; the
    classifier (``fc.*``) is dropped.
    """
    state = read_state_dict(path, "DLA-34 weights")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    load_fitting(trunk, state, f"{path} does not fit DLA34 (expected dla34-ba72cf86.pth from the DLA authors; "
                 "model.pretrained=null trains from scratch)")
    log.info("loaded ImageNet DLA-34 weights from %s", path)


def read_state_dict(source: str, what: str) -> Mapping[str, torch.Tensor]:
    """The state dict in the ``torch.save`` file at ``source``: bare or under ``"state_dict"``."""
    if not storage.is_file(source):  # here: on a cluster, a node without the file the driver found
        raise UserInputError(f"model.pretrained: no weights file {source} on {socket.gethostname()} (every training "
                             "worker reads it at that path: copy it there, or use an s3:// or gs:// URI)")
    state = load_torch_file(source, "cpu", what)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserInputError(f"{source} is not {what}: it holds a {type(state).__name__} that is not a state "
                             "dict of tensors")
    return state


def load_fitting(module: nn.Module, state: Mapping[str, torch.Tensor], refusal: str,
                 shown: Callable[[str], str] = str) -> None:
    """``module.load_state_dict(state)`` when every key and shape fits; else a ``UserInputError``
    starting with ``refusal`` that lists what is missing, unexpected and of the wrong shape (each key
    as ``shown`` names it)."""
    expected = module.state_dict()
    # files saved before PyTorch 0.4.1 (the DLA authors') have no BN step counters: the module's stay
    missing = [shown(key) for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [shown(key) for key in state if key not in expected]
    mismatched = [f"{shown(key)} {tuple(value.shape)} (the model's {tuple(expected[key].shape)})"
                  for key, value in state.items() if key in expected and value.shape != expected[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("wrong shape", mismatched)) if keys]
        raise UserInputError(f"{refusal}: " + "; ".join(problems))
    module.load_state_dict(state)  # BatchNorm fills in the step counters a file lacks
