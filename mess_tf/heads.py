"""Segmentation heads: the final DeepLab head and the design space of light exit heads.

Heads are built as plain functional layers inside the network's graph (no nested models), so the
graph tools can cut the network into stages and quantisation tooling sees ordinary layers.
Every head ends with bilinear upsampling of its logits to the input size.
"""
import dataclasses
import re

from mess_tf.keras_lib import layers

EXIT_KINDS = ("fcn", "aspp")
FINAL_KINDS = ("deeplabv3", "deeplabv3plus")


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    """One point of the exit-head design space (DESIGN.md §1.1).

    Attributes:
      kind: "fcn" (convs + 1x1 classifier) or "aspp" (a light ASPP: 1x1, two dilated separable
        3x3 branches and image pooling).
      width: channels of the 1x1 channel-reduction conv; 0 = none (a bare 1x1 classifier).
      blocks: extra separable 3x3 conv blocks after the reduction ("fcn" only).
      rapid_dilation: dilation grows fast inside the head (2, 4, 8, ... per block for "fcn";
        rates (4, 8) instead of (2, 4) for "aspp"), for receptive field at shallow positions.
    """

    kind: str = "fcn"
    width: int = 64
    blocks: int = 0
    rapid_dilation: bool = False

    def __post_init__(self):
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"unknown exit-head kind {self.kind!r}; expected one of {EXIT_KINDS}")
        if self.width < 0 or self.blocks < 0:
            raise ValueError(f"exit head {self}: width and blocks must be >= 0")
        if self.width == 0 and (self.blocks or self.kind != "fcn"):
            raise ValueError("width=0 (no channel reduction) is only the bare fcn classifier, with blocks=0")
        if self.kind == "aspp" and self.blocks:
            raise ValueError("an aspp exit head has no extra blocks")

    @property
    def id(self):
        """Stable string id, e.g. `fcn_w64_b2_rd`, `aspp_w128`."""
        blocks = f"_b{self.blocks}" if self.kind == "fcn" else ""
        return f"{self.kind}_w{self.width}{blocks}{'_rd' if self.rapid_dilation else ''}"

    @classmethod
    def from_id(cls, head_id):
        """Parses an id made by `.id`; raises a ValueError naming the id otherwise."""
        m = re.fullmatch(r"(fcn)_w(\d+)_b(\d+)(_rd)?|(aspp)_w(\d+)(_rd)?", head_id)
        if not m:
            raise ValueError(f"unknown exit-head id {head_id!r}; expected e.g. 'fcn_w64_b1', "
                             f"'fcn_w64_b2_rd', 'aspp_w128' (see heads.default_head_space())")
        if m.group(1):
            return cls("fcn", int(m.group(2)), int(m.group(3)), bool(m.group(4)))
        return cls("aspp", int(m.group(6)), 0, bool(m.group(7)))


def default_head_space():
    """The default exit-head design space, from a bare 1x1 classifier to a light ASPP."""
    return (
        ExitHeadConfig("fcn", 0, 0),
        ExitHeadConfig("fcn", 32, 0),
        ExitHeadConfig("fcn", 64, 0),
        ExitHeadConfig("fcn", 64, 1),
        ExitHeadConfig("fcn", 64, 2, rapid_dilation=True),
        ExitHeadConfig("fcn", 128, 1),
        ExitHeadConfig("fcn", 128, 2, rapid_dilation=True),
        ExitHeadConfig("aspp", 64),
        ExitHeadConfig("aspp", 128, rapid_dilation=True),
    )


@dataclasses.dataclass(frozen=True)
class FinalHeadConfig:
    """The network's own head: DeepLabV3 (ASPP + image pooling), optionally with the V3+ decoder.

    Attributes:
      kind: "deeplabv3" or "deeplabv3plus".
      filters: ASPP and decoder channels (256 in DeepLab; smaller for phones).
      rates: atrous rates of the three 3x3 ASPP branches; None = DeepLab's (6, 12, 18) scaled
        to the output stride (x2 at stride 8, /2 at stride 32).
      separable: depthwise-separable 3x3 convs in ASPP and decoder (mobile DeepLab).
      decoder_position: V3+ only: the position whose features the decoder fuses; None = the
        deepest position at stride 4.
      decoder_filters: V3+ only: channels of the low-level feature projection (48 in DeepLab).
    """

    kind: str = "deeplabv3"
    filters: int = 256
    rates: tuple = None
    separable: bool = False
    decoder_position: str = None
    decoder_filters: int = 48

    def __post_init__(self):
        if self.kind not in FINAL_KINDS:
            raise ValueError(f"unknown final head {self.kind!r}; expected one of {FINAL_KINDS}")
        if self.rates is not None:
            object.__setattr__(self, "rates", tuple(self.rates))

    def atrous_rates(self, output_stride):
        if self.rates:
            return self.rates
        return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))


def _conv_bn_relu(x, filters, name, kernel=1, rate=1, separable=False):
    """Conv (or depthwise-separable conv) + batch norm + ReLU."""
    if separable and kernel > 1:
        x = layers.DepthwiseConv2D(kernel, padding="same", dilation_rate=rate, use_bias=False,
                                   name=f"{name}_depthwise")(x)
        x = layers.BatchNormalization(name=f"{name}_depthwise_bn")(x)
        x = layers.ReLU(name=f"{name}_depthwise_relu")(x)
        kernel, rate = 1, 1
    x = layers.Conv2D(filters, kernel, padding="same", dilation_rate=rate, use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _image_pooling(x, filters, name):
    """ASPP's image-level branch: global average, 1x1 conv, broadcast back to the map size."""
    h, w = x.shape[1:3]
    y = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_gap")(x)
    y = layers.Conv2D(filters, 1, activation="relu", name=f"{name}_conv")(y)
    return layers.UpSampling2D((h, w), name=f"{name}_broadcast")(y)


def _aspp(x, filters, rates, name, separable):
    branches = [_conv_bn_relu(x, filters, f"{name}_b0")]
    branches += [_conv_bn_relu(x, filters, f"{name}_b{i + 1}", 3, rate, separable) for i, rate in enumerate(rates)]
    branches.append(_image_pooling(x, filters, f"{name}_pool"))
    x = layers.Concatenate(name=f"{name}_concat")(branches)
    return _conv_bn_relu(x, filters, f"{name}_project")


def _classify(x, num_classes, input_size, name):
    """1x1 classifier, then logits bilinearly upsampled to the input size: [B, H, W, classes]."""
    x = layers.Conv2D(num_classes, 1, name=f"{name}_logits")(x)
    return layers.Resizing(*input_size, interpolation="bilinear", name=f"{name}_upsample")(x)


def exit_head(features, config, num_classes, input_size, name):
    """Applies an exit head to a position's features.

    Args:
      features: KerasTensor [B, h, w, C] at the exit's position.
      config: ExitHeadConfig.
      num_classes: classes predicted.
      input_size: (H, W) of the network input, in pixels.
      name: unique layer-name prefix.

    Returns:
      logits KerasTensor [B, H, W, num_classes].
    """
    x = features
    if config.width:
        x = _conv_bn_relu(x, config.width, f"{name}_reduce")
    if config.kind == "fcn":
        for b in range(config.blocks):
            rate = 2 ** (b + 1) if config.rapid_dilation else 1
            x = _conv_bn_relu(x, config.width, f"{name}_block{b}", 3, rate, separable=True)
    else:
        rates = (4, 8) if config.rapid_dilation else (2, 4)
        x = _aspp(x, config.width, rates, f"{name}_aspp", separable=True)
    return _classify(x, num_classes, input_size, name)


def final_head(features, low_level, config, num_classes, input_size, output_stride, name="final"):
    """The DeepLabV3 / V3+ head.

    Args:
      features: backbone output [B, H/os, W/os, C].
      low_level: V3+ only: features at stride 4 [B, H/4, W/4, C'] (None for V3).
      config: FinalHeadConfig.
      output_stride: the backbone's output stride (sets the default atrous rates).

    Returns:
      logits [B, H, W, num_classes].
    """
    x = _aspp(features, config.filters, config.atrous_rates(output_stride), f"{name}_aspp", config.separable)
    if config.kind == "deeplabv3plus":
        low = _conv_bn_relu(low_level, config.decoder_filters, f"{name}_decoder_low")
        x = layers.Resizing(*low_level.shape[1:3], interpolation="bilinear", name=f"{name}_decoder_up")(x)
        x = layers.Concatenate(name=f"{name}_decoder_concat")([x, low])
        for i in range(2):
            x = _conv_bn_relu(x, config.filters, f"{name}_decoder{i}", 3, 1, config.separable)
    return _classify(x, num_classes, input_size, name)

