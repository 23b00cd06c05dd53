"""The Triton row kernels: one forward and one backward for all six row ops.

Forward: one program per row walks the vocabulary in blocks of BLOCK columns (never the
whole row: a whole-row block spills registers past ~16k columns), keeping running maxima
and sums per lane (row_math.online_update: no reduction across lanes inside the loop),
merged once after it (row_math.merge_lanes);
reverse KL and RKLD walk it a second time for their weighted sum (row_math.
reverse_kl_block). It writes the row's loss and four float32 statistics; with WRITE_GRAD
it then walks the row again and writes the gradient (the fused path of sum/mean
reductions). Every later walk goes against the direction of the one before (pass 1
forwards, reverse KL's second pass backwards, the gradient forwards again; the other ops'
gradient backwards), so that it starts on the blocks still in L2. Backward: program (r, j) writes blocks
[j * BLOCKS_PER_PROGRAM, (j + 1) * BLOCKS_PER_PROGRAM) of row r's gradient from the saved
statistics, so that a few long rows still fill the GPU.

Rows are addressed as RowView does (csrc/common/row_args.h): row r of a [B, T, V] tensor
starts at (r // T) * outer_stride + (r % T) * inner_stride, in 64-bit arithmetic, so that
logits[:, :-1] is read in place and N * V may exceed 2^31. An ignored row reads nothing
(its loads are masked off, its loops run zero times) and gets exact zeros.
"""
import triton
import triton.language as tl

from .row_math import (FORWARD_KL, JSD, NEG_INF, REVERSE_KL, RKLD, finalize, grad_at_label, grad_block, jsd_terms,
                       load_block, merge_lanes, online_update, reverse_kl_block, round_to_bf16)

NUM_STATS = tl.constexpr(5)  # per-row statistics (row_math.finalize)


@triton.jit
def _row_start(base, r, inner_rows, inner_stride, outer_stride):
    return base + ((r // inner_rows) * outer_stride + (r % inner_rows) * inner_stride)


@triton.jit
def _row_label(LABELS, r, V, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, columns to read): a row without labels reads all V columns, an ignored row
    none (one comparison `cols < limit` masks both: the interpreter of Triton 3.9 turns
    `cols < V & keep`, a vector-and-scalar mask, into integers that tl.load refuses)."""
    if HAS_LABELS:
        y = tl.load(LABELS + r)
        limit = tl.where(y == ignore_index, 0, V)
    else:
        y = tl.full([], -1, tl.int64)
        limit = tl.zeros([], tl.int32) + V
    return y, limit


@triton.jit
def _nan_without_label(x, y, V, NEEDS_LABEL: tl.constexpr):
    """x, or NaN for an op that needs a label and meets one outside [0, V): such a row's
    loss and gradient are NaN (the Python layer refuses those labels; a kernel that meets
    one never reads out of bounds)."""
    if NEEDS_LABEL:
        x = tl.where((y >= 0) & (y < V), x, float("nan"))
    return x


@triton.jit
def _write_grad(s_row, t_row, t2_row, g_row, first, end, V, limit, y, inv_t, alpha, gamma, softcap, smoothing,
                smoothing_per_elem, z_scale, beta, one_minus_beta, stat0, stat1, stat2, stat3, stat4, g,
                REVERSE: tl.constexpr, OP: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """Writes blocks [first, end) of a row's gradient (in reverse order if REVERSE), times
    the softcap's derivative; a bfloat16 gradient rounded to nearest even (round_to_bf16)."""
    label_grad = grad_at_label(stat0, stat1, stat2, g, smoothing, smoothing_per_elem, z_scale, OP)
    lanes = tl.arange(0, BLOCK)
    for i in range(first, end):
        if REVERSE:
            cols = (end - 1 - (i - first)) * BLOCK + lanes
        else:
            cols = i * BLOCK + lanes
        s, t, dcap = load_block(s_row, t_row, t2_row, cols, cols < limit, y, inv_t, alpha, gamma, softcap, SOFTCAP,
                                OP)
        out = grad_block(s, t, cols, y, stat0, stat1, stat2, stat3, stat4, g, label_grad, smoothing_per_elem,
                         z_scale, beta, one_minus_beta, OP)
        if SOFTCAP:
            out = out * dcap
        out = tl.where(limit > 0, out, 0.0)
        if g_row.dtype.element_ty == tl.bfloat16:
            out = round_to_bf16(out)
        tl.store(g_row + cols, out, mask=cols < V)


@triton.jit
def row_forward_kernel(
    S, s_rows, s_inner, s_outer,
    T, t_rows, t_inner, t_outer,
    T2, t2_rows, t2_inner, t2_outer,
    G, g_rows, g_inner, g_outer,
    LABELS, VALUES, STATS,
    V, ignore_index, inv_t, alpha, gamma, softcap, smoothing, smoothing_per_elem, z_scale, beta, one_minus_beta,
    GRAD_SCALE,
    OP: tl.constexpr, HAS_LABELS: tl.constexpr, NEEDS_LABEL: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    y, limit = _row_label(LABELS, r, V, ignore_index, HAS_LABELS)
    s_row = _row_start(S, r, s_rows, s_inner, s_outer)
    t_row = _row_start(T, r, t_rows, t_inner, t_outer)
    t2_row = _row_start(T2, r, t2_rows, t2_inner, t2_outer)
    lanes = tl.arange(0, BLOCK)
    ms = tl.full([BLOCK], NEG_INF, tl.float32)  # per-lane running maxima ...
    mt = tl.full([BLOCK], NEG_INF, tl.float32)
    ss = tl.zeros([BLOCK], tl.float32)  # ... and per-lane sums shifted by them
    st = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    # Two blocks ahead: each iteration issues the loads of the block after next before the
    # current block's math, and they are not read before the next iteration is over, so
    # that they are in flight during a whole block's math (one block ahead, the compiler
    # issues them late in the current block's math: their registers are the current
    # block's). `cols < limit` reads nothing past the row, nothing at all for an ignored
    # row (limit = 0).
    cols = lanes
    s, t, _ = load_block(s_row, t_row, t2_row, cols, cols < limit, y, inv_t, alpha, gamma, softcap, SOFTCAP, OP)
    cols1 = BLOCK + lanes
    s1, t1, _ = load_block(s_row, t_row, t2_row, cols1, cols1 < limit, y, inv_t, alpha, gamma, softcap, SOFTCAP, OP)
    for b0 in range(0, limit, BLOCK):
        next_cols = b0 + 2 * BLOCK + lanes
        next_s, next_t, _ = load_block(s_row, t_row, t2_row, next_cols, next_cols < limit, y, inv_t, alpha, gamma,
                                       softcap, SOFTCAP, OP)
        ms, mt, ss, st, acc = online_update(s, t, cols, cols < V, y, ms, mt, ss, st, acc, OP)
        cols, s, t = cols1, s1, t1
        cols1, s1, t1 = next_cols, next_s, next_t
    ms0, mt0, ss, st, acc = merge_lanes(ms, mt, ss, st, acc, OP)  # scalars from here on
    if OP == REVERSE_KL or OP == RKLD:  # the second pass, in reverse: its blocks are still in L2
        num_blocks = tl.cdiv(limit, BLOCK)
        lane_acc = tl.zeros([BLOCK], tl.float32)  # per lane: no reduction inside the loop
        for i in range(0, num_blocks):
            cols = (num_blocks - 1 - i) * BLOCK + lanes
            s, t, _ = load_block(s_row, t_row, t2_row, cols, cols < V, y, inv_t, alpha, gamma, softcap, SOFTCAP, OP)
            lane_acc += reverse_kl_block(s, t, ms0, mt0)
        acc = tl.sum(lane_acc, 0)

    if OP < FORWARD_KL:  # the label's logit, left out of ss
        label_cols = tl.where((y >= 0) & (y < V), y, 0) + tl.zeros([1], tl.int64)
        s_label, _, _ = load_block(s_row, s_row, s_row, label_cols, label_cols >= 0, y, inv_t, alpha, gamma,
                                   softcap, SOFTCAP, OP)
        s_label = tl.sum(s_label, 0)
    else:
        s_label = 0.0
    value, stat1, stat2, stat3 = finalize(ms0, mt0, ss, st, acc, s_label, smoothing, z_scale, OP)
    stat4 = 0.0
    if OP == JSD:  # the second pass, in reverse, with both log-sums known
        num_blocks = tl.cdiv(limit, BLOCK)
        vsum = tl.zeros([BLOCK], tl.float32)
        pbsum = tl.zeros([BLOCK], tl.float32)
        for i in range(0, num_blocks):
            cols = (num_blocks - 1 - i) * BLOCK + lanes
            s, t, _ = load_block(s_row, t_row, t2_row, cols, cols < V, y, inv_t, alpha, gamma, softcap, SOFTCAP, OP)
            v, pb = jsd_terms(s, t, ms0, stat1, stat2, stat3, beta, one_minus_beta)
            vsum += v
            pbsum += pb
        value = tl.sum(vsum, 0)
        stat4 = tl.sum(pbsum, 0)
    value = _nan_without_label(value, y, V, NEEDS_LABEL)
    keep = limit > 0
    tl.store(VALUES + r, tl.where(keep, value, 0.0))
    tl.store(STATS + r * NUM_STATS, tl.where(keep, ms0, 0.0))
    tl.store(STATS + r * NUM_STATS + 1, tl.where(keep, stat1, 0.0))
    tl.store(STATS + r * NUM_STATS + 2, tl.where(keep, stat2, 0.0))
    tl.store(STATS + r * NUM_STATS + 3, tl.where(keep, stat3, 0.0))
    tl.store(STATS + r * NUM_STATS + 4, tl.where(keep, stat4, 0.0))
    if WRITE_GRAD:  # against the previous walk's direction: its last blocks are the ones still in L2
        forwards = not (OP == REVERSE_KL or OP == RKLD or OP == JSD)
        grad_scale = tl.load(GRAD_SCALE) * inv_t  # on the device: the mean's divisor is never on the host
        _write_grad(s_row, t_row, t2_row, _row_start(G, r, g_rows, g_inner, g_outer), 0, tl.cdiv(V, BLOCK), V,
                    limit, y, inv_t, alpha, gamma, softcap, smoothing, smoothing_per_elem, z_scale, beta,
                    one_minus_beta, ms0, stat1, stat2, stat3, stat4,
                    _nan_without_label(grad_scale, y, V, NEEDS_LABEL), forwards, OP, SOFTCAP, BLOCK)


@triton.jit
def row_backward_kernel(
    S, s_rows, s_inner, s_outer,
    T, t_rows, t_inner, t_outer,
    T2, t2_rows, t2_inner, t2_outer,
    G, g_rows, g_inner, g_outer,
    LABELS, STATS, GRAD_ROWS,
    V, ignore_index, inv_t, alpha, gamma, softcap, smoothing, smoothing_per_elem, z_scale, beta, one_minus_beta,
    blocks_per_program,
    OP: tl.constexpr, HAS_LABELS: tl.constexpr, NEEDS_LABEL: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * blocks_per_program
    end = tl.minimum(first + blocks_per_program, tl.cdiv(V, BLOCK))
    y, limit = _row_label(LABELS, r, V, ignore_index, HAS_LABELS)
    g = _nan_without_label(tl.load(GRAD_ROWS + r) * inv_t, y, V, NEEDS_LABEL)
    _write_grad(_row_start(S, r, s_rows, s_inner, s_outer), _row_start(T, r, t_rows, t_inner, t_outer),
                _row_start(T2, r, t2_rows, t2_inner, t2_outer), _row_start(G, r, g_rows, g_inner, g_outer),
                first, end, V, limit, y, inv_t, alpha, gamma, softcap, smoothing, smoothing_per_elem, z_scale, beta,
                one_minus_beta, tl.load(STATS + r * NUM_STATS), tl.load(STATS + r * NUM_STATS + 1),
                tl.load(STATS + r * NUM_STATS + 2), tl.load(STATS + r * NUM_STATS + 3),
                tl.load(STATS + r * NUM_STATS + 4), g, False, OP, SOFTCAP, BLOCK)
