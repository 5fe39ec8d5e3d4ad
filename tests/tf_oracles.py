"""TensorFlow as an independent oracle, for cases its CPU kernels refuse.

TensorFlow's CPU Conv2DBackpropInput/Filter reject dilation rates above 1, and its forward
conv rejects strides > 1 together with dilations > 1. A dilated convolution is the same
function as an undilated one whose filter has (d - 1) zeros inserted between taps, so the
oracle builds that filter and lets TensorFlow's ordinary conv (and its gradients) do the rest.
The padding agrees: SAME pads for the effective kernel size (k - 1) * d + 1 either way.
"""



def tf_padding(padding):
    """tfaccum's padding argument in tf.nn.conv2d's form."""
    if isinstance(padding, str):
        return padding
    return [[0, 0], list(padding[0]), list(padding[1]), [0, 0]]


def dilate_filter(w, dilations):
    """[KH, KW, Cin, Cout] -> [(KH-1)*dh+1, (KW-1)*dw+1, Cin, Cout] with zeros between taps."""
    import tensorflow as tf  # imported on use: the reference tests run without TensorFlow

    w = tf.convert_to_tensor(w)
    dh, dw = dilations
    kh, kw, cin, cout = w.shape
    # interleave zeros along each spatial axis: stack [w, 0, ..., 0] and drop the trailing zeros
    w = tf.reshape(tf.stack([w] + [tf.zeros_like(w)] * (dh - 1), axis=1), [kh * dh, kw, cin, cout])
    w = w[:(kh - 1) * dh + 1]
    w = tf.reshape(tf.stack([w] + [tf.zeros_like(w)] * (dw - 1), axis=2),
                   [(kh - 1) * dh + 1, kw * dw, cin, cout])
    return w[:, :(kw - 1) * dw + 1]


def conv2d(x, w, strides, padding, dilations):
    """tf.nn.conv2d for any strides/dilations, differentiable in x and w on CPU."""
    import tensorflow as tf

    return tf.nn.conv2d(x, dilate_filter(w, dilations), strides=strides,
                        padding=tf_padding(padding))
