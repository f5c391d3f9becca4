"""napari plugin `xmdl-tf`: reader, sample data and widgets (manifest: napari.yaml).

Install with `pip install -e ".[napari]"`; the widgets are under Plugins > xmdl-tf.
The plain functions the widgets call (`segment_layer`, `finetune_on_layers`,
...) are in `xmdl_tf.napari.layers`, for scripts and tests. Importing this
package imports neither napari nor TensorFlow.
"""
