"""grokconv: exact, streaming, verified conversion of xAI Grok-1 weights.

The data path is reader -> mapping -> quantizer -> writer:

* ``grokconv.formats``  readers and writers of each on-disk format
* ``grokconv.mapping``  layouts declared as data in ``mappings/``
* ``grokconv.quant``    quantization schemes
* ``grokconv.convert``  the one call that joins them
"""
__version__ = "0.1.0"
