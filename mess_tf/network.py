"""MultiExitNetwork: a DeepLab network plus any set of early exits, and its stage models.

One object owns one set of layers (backbone, final head, exit heads). From it come, all sharing
those layers and so their weights:
  * `model`: every exit, outputs keyed by exit id (`position:head_id`) and "final";
  * `single_exit_model()`: the original DeepLab network;
  * `subset_model(ids)`: the network with only some exits;
  * `stage_models(ids)`: the network cut after each chosen exit. Stage k takes what earlier
    stages computed and later stages need (the feature map at position k-1; for V3+ also the
    decoder's low-level features) and returns exit k's logits plus what later stages need.
    Chaining them reproduces `subset_model(ids)`.
"""
import dataclasses
import json
import os
import re
import zipfile
from typing import Optional

from mess_tf import backbones, graph, heads
from mess_tf.deployment import FINAL_EXIT, exit_id
from mess_tf.keras_lib import keras

EXIT_LOGITS = "exit_logits"
EXIT_COARSE_LOGITS = "exit_coarse_logits"  # the exit's logits before upsampling (policy input)
WRAPPED = "wrapped"  # WrappedConfig.kind


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Everything that fixes a network's architecture.

    Attributes:
      backbone: BackboneConfig.
      num_classes: classes predicted (ignore label excluded).
      input_size: (H, W) in pixels; divisible by the output stride.
      final_head: FinalHeadConfig.
    """

    backbone: backbones.BackboneConfig = backbones.BackboneConfig()
    num_classes: int = 21
    input_size: tuple = (512, 512)
    final_head: heads.FinalHeadConfig = heads.FinalHeadConfig()

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(self.input_size))
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: a segmentation network needs at least 2 classes")
        backbones.check_input_size(self.input_size, self.backbone.output_stride)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(backbone=backbones.BackboneConfig(**d.pop("backbone")),
                   final_head=heads.FinalHeadConfig(**d.pop("final_head")), **d)


@dataclasses.dataclass(frozen=True)
class WrappedConfig:
    """A user's own functional Keras model as the network (MultiExitNetwork.wrap).

    Attributes:
      model_path: the saved .keras file that rebuilds it (None for a model wrapped in memory). It
        is loaded in Keras' safe mode: no code stored in the file runs.
      position_names: its layers whose outputs are candidate exit positions, in depth order.
      num_classes: classes it predicts (its output's last dimension).
      input_size: (H, W) of its input, in pixels.
    """

    model_path: Optional[str]
    position_names: tuple
    num_classes: int
    input_size: tuple
    kind: str = WRAPPED

    def __post_init__(self):
        object.__setattr__(self, "position_names", tuple(self.position_names))
        object.__setattr__(self, "input_size", tuple(self.input_size))

    def to_dict(self):
        return dataclasses.asdict(self)


def config_from_dict(d):
    """A NetworkConfig or WrappedConfig from its to_dict()."""
    if d.get("kind") == WRAPPED:
        return WrappedConfig(**d)
    return NetworkConfig.from_dict(d)


def load_user_model(path):
    """A user's saved functional Keras model (.keras), loaded without running code from the file.

    Every user model is loaded here. Keras' safe mode refuses the code a .keras file can carry (a
    Lambda's bytecode), but only in the .keras (zip) format: given any other file, load_model
    goes to the HDF5 loader, which ignores safe mode and runs it. So the file's format is checked
    from its contents, not its name, and so is every class its config names: Keras imports the
    module a config names, so a name outside Keras would run that module's code.

    Raises:
      FileNotFoundError or ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras model not found: {path}")
    if not path.endswith(".keras"):
        raise ValueError(f"{path}: expected a Keras model saved with model.save('NAME.keras')")
    _check_keras_archive(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types here; the message is what the user needs
        raise ValueError(f"cannot load Keras model {path}: {str(e).splitlines()[0]}") from None


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_keras_archive(path):
    """Raises unless `path` is a .keras zip archive whose config names only Keras' own classes."""
    with open(path, "rb") as f:
        is_hdf5 = f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    resave = "if you trust the file, load it yourself and re-save it with model.save('x.keras')"
    if is_hdf5:
        raise ValueError(f"cannot load Keras model {path}: it is an HDF5 (.h5) model, whose loader can run code "
                         f"stored in the file; {resave}")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ValueError(f"cannot load Keras model {path}: not a .keras archive ({e}); {resave}") from None
    foreign = sorted({f"{module}.{name}" for module, name in _named_classes(config)
                      if module.split(".")[0] not in ("keras", "tf_keras")})
    if foreign:
        raise ValueError(f"cannot load Keras model {path}: it names {foreign}, outside Keras, which loading would "
                         f"import; build the model from Keras layers only")


def _named_classes(config):
    """(module, class name) of every object a Keras config names, nested ones included."""
    if isinstance(config, dict):
        if isinstance(config.get("module"), str):
            yield config["module"], config.get("class_name")
        for value in config.values():
            yield from _named_classes(value)
    elif isinstance(config, list):
        for value in config:
            yield from _named_classes(value)


def _check_user_model(model):
    """Raises, saying what to change, unless `model` is one flat functional graph from images of a
    fixed size [B, H, W, 3] to logits [B, h, w, classes]: exits, stages, MAC counts and int8
    scales are all per layer and per input size."""
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        raise ValueError(f"model {model.name!r} calls the model(s) {nested} as one layer, so the layers inside (the "
                         f"exit positions) are not in its graph; build it as one functional graph: "
                         f"base = MobileNetV2(input_tensor=image, ...), then base.get_layer(NAME).output, not "
                         f"base(image) (two lines in the README's quick start for your own model)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r} has {len(model.inputs)} input(s) and {len(model.outputs)} output(s); "
                         f"expected one input, the images [B, H, W, 3], and one output, the logits [B, h, w, classes]")
    image, logits = tuple(model.input.shape[1:]), tuple(model.output.shape[1:])
    if len(image) != 3 or None in image or image[2] != 3:
        raise ValueError(f"model {model.name!r} takes input of shape {image}; expected RGB images of a fixed size "
                         f"(H, W, 3): build it on keras.Input((H, W, 3))")
    if len(logits) != 3 or None in logits:
        raise ValueError(f"model {model.name!r} returns shape {logits}; expected logits (h, w, classes) of a fixed "
                         f"size")


def build(config, exits=()):
    """The MultiExitNetwork of a NetworkConfig (built here) or a WrappedConfig (the user's model,
    loaded from its file), with `exits` attached."""
    if isinstance(config, WrappedConfig):
        if config.model_path is None:
            raise ValueError("this wrapped network was made in memory (model_path None); save the Keras model "
                             "as .keras and wrap it with tools.wrap to rebuild it from a run")
        return MultiExitNetwork.wrap(load_user_model(config.model_path), config.position_names, exits,
                                     model_path=config.model_path)
    return MultiExitNetwork(config, exits)


def _layer_prefix(position, head_id):
    return "exit_" + re.sub(r"[^A-Za-z0-9_]", "_", position) + "__" + head_id


def parse_exit_id(eid):
    """`position:head_id` -> (position, ExitHeadConfig)."""
    position, sep, head_id = eid.rpartition(":")
    if not sep:
        raise ValueError(f"exit id {eid!r} is not of the form 'position:head_id'")
    return position, heads.ExitHeadConfig.from_id(head_id)


class MultiExitNetwork:
    """A backbone, the final head, and a set of (position, head) exits.

    Args:
      config: NetworkConfig.
      exits: iterable of exit ids, or of (position name, ExitHeadConfig) pairs.

    Attributes:
      config: the NetworkConfig, or the WrappedConfig of a wrapped user model.
      backbone: backbones.Backbone.
      exit_ids: exit ids in depth order (positions, then the order given).
      model: keras Model, images [B, H, W, 3] RGB 0..255 -> {exit id | "final": logits [B, H, W, classes]}.
    """

    def __init__(self, config, exits=()):
        backbone = backbones.Backbone(config.backbone, config.input_size)
        low_level = None
        if config.final_head.kind == "deeplabv3plus":
            low_level = backbone.feature(backbone.decoder_position(config.final_head.decoder_position))
        final = heads.final_head(backbone.model.output, low_level, config.final_head, config.num_classes,
                                 config.input_size, config.backbone.output_stride)
        self._attach(config, backbone, final, exits)

    @classmethod
    def wrap(cls, model, position_names, exits=(), model_path=None):
        """A user's functional segmentation model as a multi-exit network.

        Args:
          model: functional Keras model, images [B, H, W, 3] RGB 0..255 -> logits [B, h, w, classes]
            (upsampled bilinearly to H x W if smaller).
          position_names: names of its layers that are candidate exit positions.
          exits: exit ids or (position, ExitHeadConfig) pairs, as for the constructor.
          model_path: the .keras file `model` was loaded from, recorded in the WrappedConfig.

        Raises:
          ValueError saying what to change, for a model that cannot be cut into stages.
        """
        _check_user_model(model)
        final = model.output
        if tuple(final.shape[1:3]) != tuple(model.input.shape[1:3]):
            final = keras.layers.Resizing(*model.input.shape[1:3], interpolation="bilinear",
                                          name="final_upsample")(final)
        backbone = backbones.Backbone.from_model(model, position_names)
        config = WrappedConfig(model_path and os.fspath(model_path), [p.name for p in backbone.positions],
                               int(final.shape[-1]), backbone.input_size)
        network = cls.__new__(cls)
        network._attach(config, backbone, final, exits)
        return network

    def _attach(self, config, backbone, final_logits, exits):
        """Adds exit heads to `backbone`'s positions; the final exit is `final_logits`."""
        self.config, self.backbone = config, backbone
        num_classes, input_size = final_logits.shape[-1], backbone.input_size
        pairs = [parse_exit_id(e) if isinstance(e, str) else tuple(e) for e in exits]
        for position, _ in pairs:
            backbone.position(position)  # raises on an unknown position
        pairs.sort(key=lambda pair: backbone.position(pair[0]).index)
        self._logits = {}
        for position, head in pairs:
            eid = exit_id(position, head.id)
            if eid in self._logits:
                raise ValueError(f"exit {eid!r} is listed twice")
            self._logits[eid] = heads.exit_head(backbone.feature(position), head, num_classes,
                                                input_size, _layer_prefix(position, head.id))
        self.exit_ids = list(self._logits)
        self._logits[FINAL_EXIT] = final_logits
        self.model = self.subset_model(self.exit_ids)

    @property
    def image(self):
        return self.backbone.model.input

    @property
    def output_stride(self):
        """Output stride of the backbone's last position (the final exit's policy stride)."""
        return self.backbone.positions[-1].stride

    def final_head_positions(self):
        """Names of the positions whose features the final head reads, in depth order: the last
        position, and any earlier one it reads directly (DeepLabV3+'s decoder, a user model's skip).

        Raises:
          ValueError if it reads a backbone tensor that is no position's output (the network could
          not be cut there).
        """
        layers = {layer.name: layer for layer in graph.topological_layers([self._logits[FINAL_EXIT]])}
        backbone_layers = graph.ancestors([self.backbone.model.output])
        read = {p.name for name in set(layers) - backbone_layers for p in graph.parents(layers[name])
                if p.name in backbone_layers}
        position_names = {p.name for p in self.backbone.positions}
        stray = sorted(read - position_names)
        if stray:
            raise ValueError(f"the final head reads the output of layer(s) {stray} inside the backbone, which are not "
                             f"candidate positions; add them to the positions so the network can be cut there")
        return [p.name for p in self.backbone.positions if p.name in read | {self.backbone.positions[-1].name}]

    def position_of(self, eid):
        """The Position an exit reads from."""
        return self.backbone.position(parse_exit_id(eid)[0])

    def _check_ids(self, ids):
        unknown = [e for e in ids if e not in self._logits or e == FINAL_EXIT]
        if unknown:
            raise ValueError(f"exits {unknown} are not in this network; it has {self.exit_ids}")

    def subset_model(self, ids):
        """The network with only the exits `ids` (and the final exit), sharing weights."""
        self._check_ids(ids)
        ordered = [e for e in self.exit_ids if e in set(ids)]
        outputs = {e: self._logits[e] for e in ordered + [FINAL_EXIT]}
        return keras.Model(self.image, outputs, name="mess")

    def single_exit_model(self):
        """The original single-exit DeepLab network, sharing weights."""
        return self.subset_model([])

    def logits(self, eid):
        """The logits KerasTensor of exit `eid` (or "final")."""
        return self._logits[eid]

    def coarse_logits(self, eid):
        """Exit `eid`'s logits at its own output resolution [B, H/stride, W/stride, C]: the input
        of its bilinear `*_upsample` layer (the logits themselves when there is none). The exit
        policy's confidence is computed on these (mess_tf/policy.py)."""
        logits = self._logits[eid]
        layer = logits._keras_history.layer
        return layer.input if layer.name.endswith("_upsample") else logits

    # -- stages --------------------------------------------------------------------------------

    def stage_models(self, ids, truncate=False):
        """Cuts the network after each exit in `ids`.

        Args:
          ids: exit ids in depth order (at most one per position).
          truncate: if True, stop after the last exit (a budgeted model) instead of adding a
            final stage that runs the rest of the backbone and the final head.

        Returns:
          list of keras Models. Stage 1 takes {"image"}; stage k takes tensors named after the
          layers that produced them in stage < k. Each returns {EXIT_LOGITS: logits,
          EXIT_COARSE_LOGITS: the same exit's coarse_logits} plus the named tensors it computes
          that later stages need. A tensor goes from the stage that computes it straight to every
          stage that reads it (e.g. V3+'s stride-4 features to the last stage), never through the
          stages between: a pass-through would be a tensor no op touches, which int8 conversion
          leaves unquantised. Chained in order, each stage fed from the outputs of all earlier
          ones, they reproduce `subset_model(ids)` exit by exit.
        """
        self._check_ids(ids)
        positions = [self.position_of(e).index for e in ids]
        if positions != sorted(set(positions)):
            raise ValueError(f"stage exits must be at increasing positions, got {ids}")
        anchors = [[self._logits[e], self.backbone.feature(self.position_of(e).name)] for e in ids]
        if not truncate:
            anchors.append([self._logits[FINAL_EXIT]])
        stage_layers, done = [], set()
        for outputs in anchors:
            needed = graph.ancestors(outputs) - done
            stage_layers.append(needed)
            done |= needed
        order = graph.topological_layers(list(self._logits.values()))
        coarse = [self.coarse_logits(e) for e in ids] + ([] if truncate else [self.coarse_logits(FINAL_EXIT)])
        return [self._stage(k, anchors[k][0], coarse[k], stage_layers, order) for k in range(len(anchors))]

    def _stage(self, k, logits, coarse_logits, stage_layers, order):
        """Stage k+1: replays its layers from new inputs for what earlier stages computed."""
        by_name = {layer.name: layer for layer in order}
        rank = {layer.name: i for i, layer in enumerate(order)}
        mine, earlier = stage_layers[k], set().union(*stage_layers[:k])
        later = set().union(*stage_layers[k + 1:])

        def produced_for(consumers, sources):
            names = {p.name for c in consumers for p in graph.parents(by_name[c]) if p.name in sources}
            return sorted(names, key=rank.get)

        carried = produced_for(later, mine)
        if k == 0:
            new_inputs = {"image": keras.Input(self.image.shape[1:], name="image")}
            feeds = [(self.image, new_inputs["image"])]
        else:  # what this stage consumes from earlier stages
            needed = produced_for(mine, earlier)
            new_inputs = {_io_name(n): keras.Input(by_name[n].output.shape[1:], name=_io_name(n)) for n in needed}
            children = {}
            for name in mine:
                for parent in graph.parents(by_name[name]):
                    children.setdefault(parent.name, []).append(by_name[name])
            feeds = [(by_name[n].output, _handoff(new_inputs[_io_name(n)], n, children)) for n in needed]
        targets = {EXIT_LOGITS: logits, EXIT_COARSE_LOGITS: coarse_logits,
                   **{_io_name(n): by_name[n].output for n in carried}}
        return keras.Model(new_inputs, graph.replay(targets, feeds), name=f"stage_{k + 1}")


# Layers whose int8 kernels give their output the scale of their input: a tensor passes through
# them to its consumer with its scale unchanged.
_SCALE_PRESERVING = (keras.layers.AveragePooling2D, keras.layers.MaxPooling2D, keras.layers.UpSampling2D,
                     keras.layers.Resizing, keras.layers.Reshape, keras.layers.ZeroPadding2D, keras.layers.Cropping2D)


def _handoff(stage_input, layer_name, children):
    """A stage input as its layers read it: through an identity 1x1 depthwise convolution if it
    reaches a Concatenate by scale-preserving layers only.

    int8 concatenation needs all its inputs at its output's scale. The converter meets that by
    re-scaling whatever feeds it, and a stage input it can re-scale is a signature input: the
    earlier stage's int8 output would then be read with another scale (a broken hand-off, which
    export.check_int8_handoff refuses). The identity convolution (weights 1, exact in float and in
    int8) requantises the tensor inside this stage, so the input keeps its producer's scale.
    """
    frontier, seen = [layer_name], set()
    while frontier:
        for child in children.get(frontier.pop(), []):
            if isinstance(child, keras.layers.Concatenate):
                return keras.layers.DepthwiseConv2D(1, use_bias=False, depthwise_initializer="ones", trainable=False,
                                                    name=_io_name(layer_name) + "_handoff")(stage_input)
            if isinstance(child, _SCALE_PRESERVING) and child.name not in seen:
                seen.add(child.name)
                frontier.append(child.name)
    return stage_input


def _io_name(layer_name):
    """A stage input/output name (TFLite signature names allow [A-Za-z0-9_])."""
    return re.sub(r"[^A-Za-z0-9_]", "_", layer_name)
