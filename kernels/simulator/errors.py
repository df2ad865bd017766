"""Exceptions raised by the NKI CPU simulator.

Every hardware-constraint violation derives from :class:`NkiValidationError` (itself an
``AssertionError``, like the real NKI simulator's ``AssertionError: tensor_tensor data1 partition
dimension 256 exceeds maximum 128``).  Messages name the instruction, the operand, its shape and
the limit, so a failing kernel can be fixed without reading the simulator.
"""


class NkiError(Exception):
    """Base class of every error the simulator raises on purpose."""


class NkiValidationError(NkiError, AssertionError):
    """A hardware constraint of Trainium2 is violated (the real ``nki.isa.NkiValidationError``)."""


class PartitionLimitError(NkiValidationError):
    """A tile or operand spans more than 128 partitions."""


class PartitionMismatchError(NkiValidationError):
    """Operands of one instruction have different partition counts (and no documented broadcast)."""


class TileSizeError(NkiValidationError):
    """A free-size limit of an instruction is exceeded (matmul K/M/N, transpose, max8, PSUM bank...)."""


class ShapeMismatchError(NkiValidationError):
    """Operand shapes or element counts do not agree."""


class MemoryRegionError(NkiValidationError):
    """An operand lives in a buffer the engine cannot access (e.g. a compute engine reading HBM)."""


class ReductionAxisError(NkiValidationError):
    """A reduction names the partition axis, or free axes that are not the trailing ones."""


class DtypeError(NkiValidationError):
    """A dtype is not supported by the instruction or the device (e.g. float64, int64)."""


class CapacityError(NkiValidationError):
    """Live SBUF bytes per partition or live PSUM banks exceed the Trainium2 capacity."""


class OutOfBoundsError(NkiError, IndexError):
    """A static slice or a dynamic (indirect) DMA address falls outside its tensor."""


class UninitializedReadError(NkiError):
    """An instruction reads memory that nothing wrote (the real simulator would read NaN / 4)."""


class KernelInterfaceError(NkiError):
    """The kernel breaks the calling convention (outputs, inputs, nesting)."""


class OutputBufferError(KernelInterfaceError):
    """A returned tensor is not a whole ``nl.shared_hbm`` tensor."""


class ImmutableInputError(KernelInterfaceError):
    """The kernel writes into one of its input tensors."""


class OutputNotWrittenError(KernelInterfaceError):
    """A returned output has elements that no instruction wrote."""


class AccumulationError(NkiValidationError):
    """``nc_matmul`` accumulation onto PSUM whose state makes the result undefined or ambiguous."""


class UnsupportedError(NkiError, TypeError):
    """A construct the current NKI dialect (or this simulator) does not support."""


class NkiContextError(NkiError, RuntimeError):
    """An NKI API is called outside a running kernel, or a kernel is launched from inside one."""


class EngineRuleError(NkiValidationError):
    """An instruction on an engine, or with operators, its documentation does not allow."""


class ActivationRangeError(NkiValidationError):
    """A ScalarE activation function outside the documented table or its valid input range."""


class StartPartitionError(PartitionMismatchError):
    """An on-chip operand starting on a partition its partition count does not allow."""


class PythonSubsetError(NkiValidationError):
    """Python inside a traced kernel that the NKI language guide does not allow."""
