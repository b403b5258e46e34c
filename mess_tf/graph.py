"""Small tools over the layer graph of a tf_keras functional model.

Everything that cuts a network (candidate exit positions, per-segment costs, stage models for the
staged .tflite) works on the same graph view: every layer of a functional model built here is
called once, so a layer and its output tensor are the same node of a DAG.

`replay` re-applies the layers between some tensors and others to new inputs. That is how a stage
model ("feature map at position k-1 -> feature map at position k + exit k") is built from the full
network while sharing its layers, and so its weights.
"""
import tensorflow as tf


def producer(tensor):
    """The layer that produced a KerasTensor."""
    return tensor._keras_history.layer


def _node(layer):
    """The call that built the network. Networks cut here call each layer once; replays made
    later (stage models) add calls after it."""
    return layer._inbound_nodes[0]


def parents(layer):
    """Layers whose outputs `layer` consumes (none for an InputLayer)."""
    return [p.layer for p in _node(layer).parent_nodes]


def ancestors(tensors):
    """Names of all layers needed to compute `tensors` (themselves included)."""
    seen, stack = set(), [producer(t) for t in tensors]
    while stack:
        layer = stack.pop()
        if layer.name in seen:
            continue
        seen.add(layer.name)
        stack.extend(parents(layer))
    return seen


def topological_layers(outputs):
    """The layers that KerasTensors `outputs` (or a model's outputs) depend on, inputs first."""
    if hasattr(outputs, "outputs"):
        outputs = outputs.outputs
    order, done = [], set()

    def visit(layer):
        stack = [(layer, False)]
        while stack:
            current, expanded = stack.pop()
            if current.name in done:
                continue
            if expanded:
                done.add(current.name)
                order.append(current)
                continue
            stack.append((current, True))
            stack.extend((p, False) for p in parents(current) if p.name not in done)

    for t in tf.nest.flatten(outputs):
        visit(producer(t))
    return order


def articulation_layers(model):
    """Names of layers that every input-to-output path of a single-input, single-output
    model passes through, in topological order.

    Counting paths is exact on a DAG: a layer is on every path iff
    paths(input -> layer) * paths(layer -> output) == paths(input -> output).
    """
    layers = topological_layers(model)
    children = {layer.name: [] for layer in layers}
    for layer in layers:
        for p in parents(layer):
            children[p.name].append(layer.name)
    from_input = {}
    for layer in layers:
        ps = parents(layer)
        from_input[layer.name] = sum(from_input[p.name] for p in ps) if ps else 1
    to_output = {}
    for layer in reversed(layers):
        kids = children[layer.name]
        to_output[layer.name] = sum(to_output[k] for k in kids) if kids else 1
    total = from_input[layers[-1].name]
    return [layer.name for layer in layers if from_input[layer.name] * to_output[layer.name] == total]


def consumers(model):
    """Layer name -> names of the layers of `model` that consume its output."""
    out = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        if layer._inbound_nodes:
            for p in parents(layer):
                out.setdefault(p.name, []).append(layer.name)
    return out


def replay(outputs, feeds):
    """Recomputes `outputs` from new tensors fed in place of some original ones.

    Args:
      outputs: a nest of KerasTensors of an existing functional graph.
      feeds: list of (original KerasTensor, replacement tensor) pairs. Every path from the
        graph's inputs to `outputs` must cross a fed tensor.

    Returns:
      The same nest with recomputed tensors. The original layers are called again, so the
      new graph shares their weights.
    """
    memo = {id(original): new for original, new in feeds}
    for tensor in _tensors_to_compute(tf.nest.flatten(outputs), memo):
        history = tensor._keras_history
        node = history.layer._inbound_nodes[history.node_index]
        args = tf.nest.map_structure(lambda x: memo[id(x)] if _is_keras(x) else x, node.call_args)
        kwargs = tf.nest.map_structure(lambda x: memo[id(x)] if _is_keras(x) else x, node.call_kwargs)
        memo[id(tensor)] = tf.nest.flatten(history.layer(*args, **kwargs))[history.tensor_index]
    return tf.nest.map_structure(lambda t: memo[id(t)], outputs)


def _is_keras(x):
    return hasattr(x, "_keras_history")


def _tensors_to_compute(targets, fed):
    """Tensors between the fed ones and `targets`, each after the tensors it needs."""
    order, done, stack = [], set(fed), [(t, False) for t in targets]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in done:
            continue
        if expanded:
            done.add(id(tensor))
            order.append(tensor)
            continue
        history = tensor._keras_history
        node = history.layer._inbound_nodes[history.node_index]
        inputs = [x for x in tf.nest.flatten((node.call_args, node.call_kwargs)) if _is_keras(x)]
        if not inputs:
            raise ValueError(f"replay reached input {history.layer.name!r}: "
                             "it is not cut off by the feeds")
        stack.append((tensor, True))
        stack.extend((x, False) for x in inputs if id(x) not in done)
    return order
