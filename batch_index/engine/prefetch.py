"""Software prefetch for numba kernels that read rows in an order no hardware prefetcher can guess.

numba exposes no prefetch of its own; this is LLVM's ``llvm.prefetch`` (read, keep in all cache levels)
as a numba intrinsic. Used by the graph walk and the re-ranking, whose cost is random row reads.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

CACHE_LINE = 64


@intrinsic
def prefetch(typingctx, arr, index):  # type: ignore[no-untyped-def]
    """Ask for the cache line holding ``arr[index]`` of a 1-d array; returns nothing, never faults."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def prefetch_span(flat, start, count):  # type: ignore[no-untyped-def]
    """Prefetch ``flat[start:start + count]``, one request per cache line."""
    step = max(1, CACHE_LINE // flat.itemsize)
    for j in range(0, count, step):
        prefetch(flat, start + j)
    prefetch(flat, start + count - 1)
