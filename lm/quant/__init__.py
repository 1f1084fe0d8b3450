"""Quantization: QAT rules applied to a model (qat.py) and conversion of a
checkpoint to a real int8 serving model (serving.py)."""
from lm.quant.qat import (ACTIVATIONS, BACKWARD, MODES, QuantError, check,
                          dtypes, quantize, rules)
