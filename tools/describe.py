"""Describes a backbone: candidate exit positions and the MACs of every part.

  python -m tools.describe --backbone=resnet50 --input_size=512 --output_stride=8 --format=json
"""
import json

from absl import flags

import mess_cli
from mess_tf import backbones, heads, network
from mess_tf.costs import model as cost_model

FLAGS = flags.FLAGS
flags.DEFINE_enum("backbone", "mobilenet_v2", backbones.BACKBONES, "Backbone network.")
flags.DEFINE_integer("input_size", 512, "Square input size in pixels (divisible by the output stride).")
flags.DEFINE_enum("output_stride", "16", ["8", "16", "32"], "Backbone output stride.")
flags.DEFINE_float("alpha", 1.0, "Width multiplier (MobileNets).")
flags.DEFINE_integer("num_classes", 21, "Classes predicted by the heads.")
flags.DEFINE_enum("final_head", "deeplabv3", heads.FINAL_KINDS, "Final head.")
flags.DEFINE_list("heads", None, "Exit-head ids to cost (default: the default head space).")
flags.DEFINE_enum("format", "table", ["json", "table"], "Output format.")


def describe(config, head_space):
    """The JSON-ready description of a network's cost model."""
    costs = cost_model.network_costs(config, head_space)
    return {
        "backbone": config.backbone.name,
        "input_size": list(config.input_size),
        "output_stride": config.backbone.output_stride,
        "backbone_macs": costs.backbone_macs,
        # The unmodified ImageNet classifier at this input size, comparable with published MAdds.
        "classifier_macs": backbones.classification_macs(config.backbone.name, config.backbone.alpha,
                                                         config.input_size),
        "positions": [{"name": p.name, "stride": p.stride, "channels": p.channels,
                       "cumulative_macs": p.cumulative_macs} for p in costs.positions],
        "final_head_macs": costs.final_head.macs,
        "heads": [{"id": h.id, "macs_by_position": {p.name: costs.heads[f"{p.name}:{h.id}"].macs
                                                    for p in costs.positions}} for h in head_space],
    }


def format_table(d):
    """Human-readable tables of positions and head costs (MACs in millions)."""
    lines = [f"{d['backbone']} @ {d['input_size'][0]}x{d['input_size'][1]}, output stride {d['output_stride']}: "
             f"backbone {d['backbone_macs'] / 1e6:.1f} MMACs, final head {d['final_head_macs'] / 1e6:.1f} MMACs "
             f"(the ImageNet classifier: {d['classifier_macs'] / 1e6:.1f} MMACs)", ""]
    ids = [h["id"] for h in d["heads"]]
    lines.append(f"{'#':>3} {'position':<36} {'stride':>6} {'ch':>5} {'cum MMACs':>10}  " +
                 " ".join(f"{i:>14}" for i in ids))
    for k, p in enumerate(d["positions"]):
        head_macs = " ".join(f"{h['macs_by_position'][p['name']] / 1e6:>14.2f}" for h in d["heads"])
        lines.append(f"{k:>3} {p['name']:<36} {p['stride']:>6} {p['channels']:>5} "
                     f"{p['cumulative_macs'] / 1e6:>10.1f}  {head_macs}")
    lines.append("(head columns: MMACs of that exit head at that position)")
    return "\n".join(lines)


def main(argv):
    del argv
    head_space = ([heads.ExitHeadConfig.from_id(h) for h in FLAGS.heads] if FLAGS.heads
                  else list(heads.default_head_space()))
    config = network.NetworkConfig(
        backbone=backbones.BackboneConfig(FLAGS.backbone, int(FLAGS.output_stride), FLAGS.alpha),
        num_classes=FLAGS.num_classes, input_size=(FLAGS.input_size, FLAGS.input_size),
        final_head=heads.FinalHeadConfig(FLAGS.final_head))
    d = describe(config, head_space)
    print(json.dumps(d) if FLAGS.format == "json" else format_table(d))


if __name__ == "__main__":
    mess_cli.run(main)
