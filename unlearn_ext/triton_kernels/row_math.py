"""Per-element and per-row math of every row op for the Triton kernels.

A port of csrc/common/row_math.h: the same formulas, the same max-shifted accumulators and
the same per-row statistics, applied to a block of a row instead of one element. The
CPU and CUDA kernels keep one running state per row (or per thread); here the maxima are
per row (scalars) while the sums are per lane (vectors of the block's width), so that a
block costs one max-reduction and the sums are reduced once, at the end of the row.

Conventions (DESIGN.md): logits are divided by the temperature on load; -inf is a legal
(masked) logit; a NaN anywhere in a row makes the row's loss and gradient NaN.
"""
import triton
import triton.language as tl

# Op codes, the same numbers as csrc/common/row_math.h (enum class Op).
TOKEN_LOGPROB = tl.constexpr(0)  # s_y - lse(s)
CROSS_ENTROPY = tl.constexpr(1)  # lse(s) - s_y
FORWARD_KL = tl.constexpr(2)  # KL(q || p)
REVERSE_KL = tl.constexpr(3)  # KL(p || q)
RKLD = tl.constexpr(4)  # KL(p || q), teacher o - alpha * relu(a - o) built on load
UNDIAL = tl.constexpr(5)  # soft-label CE to softmax(t - gamma * onehot(y))

OP_CODES = {"token_logprob": 0, "cross_entropy": 1, "forward_kl": 2, "reverse_kl": 3, "rkld": 4, "undial": 5}
# The ops whose value reads the label's logit (token ops: codes below FORWARD_KL) or whose
# teacher depends on the label (UnDIAL): a row without a valid label gives NaN.
NEEDS_LABEL = {"token_logprob", "cross_entropy", "undial"}

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0 to a few ulp, in plain arithmetic: libdevice has no Triton
    interpreter version, and log(1 + x) loses the digits of a small x to the rounding of
    1 + x. Below 1: 2 atanh(w), w = x / (2 + x) <= 1/3, by its odd series (the next term
    is below 2e-9 relative); above, log(1 + x) >= log 2 keeps its digits."""
    w = x / (2.0 + x)
    w2 = w * w
    series = 1.0 + w2 * (1.0 / 3 + w2 * (1.0 / 5 + w2 * (1.0 / 7 + w2 * (1.0 / 9 + w2 * (
        1.0 / 11 + w2 * (1.0 / 13 + w2 * (1.0 / 15)))))))
    return tl.where(x < 1.0, 2.0 * w * series, tl.log(1.0 + x))


@triton.jit
def expm1(x):
    """exp(x) - 1 to a few ulp, in plain arithmetic (see log1p): the Taylor series below
    |x| = 1/2 (the next term is below 6e-10 relative), exp(x) - 1 above, where it cannot
    cancel more than a bit."""
    series = x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6 * (
        1.0 + x / 7 * (1.0 + x / 8 * (1.0 + x / 9))))))))
    return tl.where(tl.abs(x) < 0.5, series, tl.exp(x) - 1.0)


@triton.jit
def load_block(s_row, t_row, t2_row, cols, live, y, inv_t, alpha, gamma, OP: tl.constexpr):
    """Student and teacher logits of one block, float32, divided by the temperature; the
    teacher built from its raw inputs first. Lanes outside `live` read -inf (they add 0).

    RKLD:   o - alpha * relu(a - o); a masked original (o = -inf) stays masked, which also
            avoids -inf - -inf when both are masked. `d < 0 ? 0 : d` keeps a NaN a NaN.
    UnDIAL: t - gamma at the label (subtracted on load, never corrected afterwards)."""
    s = tl.load(s_row + cols, mask=live, other=NEG_INF).to(tl.float32) * inv_t
    if OP >= FORWARD_KL:
        t = tl.load(t_row + cols, mask=live, other=NEG_INF).to(tl.float32)
        if OP == RKLD:
            d = tl.load(t2_row + cols, mask=live, other=NEG_INF).to(tl.float32) - t
            t = tl.where(t == NEG_INF, t, t - alpha * tl.where(d < 0.0, 0.0, d))
        if OP == UNDIAL:
            t = tl.where(cols == y, t - gamma, t)
        t = t * inv_t
    else:
        t = s  # the token ops have no teacher
    return s, t


@triton.jit
def online_update(s, t, cols, y, ms, mt, ms0, mt0, ss, st, acc, OP: tl.constexpr):
    """Merges one loaded block into the row's running state and returns the new state.

    ms, mt are the running maxima of s and t; ms0, mt0 the same made safe to subtract (a
    row that is -inf so far shifts by 0, so that exp(-inf - 0) = 0 instead of
    exp(-inf - -inf) = NaN); ss, st, acc are per-lane sums shifted by them:
      ss, st  sum exp(s - ms), sum exp(t - mt); the token ops leave the label's own term
              out of ss (ms still covers it), so that finalize keeps 1 - p_y's digits
      acc     the op's weighted sum, of logits shifted by their maxima so that two nearly
              equal distributions are not lost to cancellation:
                forward KL  sum exp(t - mt) ((t - mt) - (s - ms))
                UnDIAL      sum exp(t - mt) (s - ms)
              (reverse KL's is taken by a second pass, reverse_kl_block: see there)
    A zero weight contributes exactly 0 even where the other factor is infinite (masked
    logits: 0 * log 0 = 0). When a maximum grows, the sums are rescaled and acc's shifts
    moved: sum w (x - old) = sum w (x - new) + (new - old) sum w.

    NaN never wins tl.maximum on the GPU, so a NaN maximum cannot appear (under the
    interpreter it can, and the row is NaN all the same); NaN logits reach the result
    through the sums instead (exp(NaN - m) = NaN)."""
    ms_new = tl.maximum(ms, tl.max(s, 0))
    ms0_new = tl.where(ms_new == NEG_INF, 0.0, ms_new)
    fs = tl.where(ms == ms_new, 1.0, tl.exp(ms - ms_new))
    es = tl.exp(s - ms0_new)
    if OP < FORWARD_KL:
        ss = ss * fs + tl.where(cols == y, 0.0, es)
        mt_new = mt
        mt0_new = mt0
    else:
        mt_new = tl.maximum(mt, tl.max(t, 0))
        mt0_new = tl.where(mt_new == NEG_INF, 0.0, mt_new)
        ft = tl.where(mt == mt_new, 1.0, tl.exp(mt - mt_new))
        et = tl.exp(t - mt0_new)
        ds = ms0 - ms0_new  # old shift - new shift (<= 0)
        dt = mt0 - mt0_new
        ss = ss * fs
        st = st * ft
        if OP == FORWARD_KL:
            acc = acc * ft + (dt - ds) * st + tl.where(et == 0.0, 0.0, et * ((t - mt0_new) - (s - ms0_new)))
        elif OP == UNDIAL:
            acc = acc * ft + ds * st + tl.where(et == 0.0, 0.0, et * (s - ms0_new))
        ss += es
        st += et
    return ms_new, mt_new, ms0_new, mt0_new, ss, st, acc


@triton.jit
def reverse_kl_block(s, t, ms0, mt0):
    """One block's share of reverse KL's sum exp(s - ms) ((s - ms) - (t - mt)), at the row's
    final (safe) maxima. It takes a second pass over the row because the gradient,
    p ((s - ms) - (t - mt) - KL), cancels the same difference against its mean: computed
    by the same float operations as in grad_block, the two cancel as they do in PyTorch
    (a one-hot p gets an exact 0), whereas moving the sum's shift each time a maximum
    grows leaves a rounding of the size of the logits (1e-2 at logits of 1e4)."""
    es = tl.exp(s - ms0)
    return tl.where(es == 0.0, 0.0, es * ((s - ms0) - (t - mt0)))


@triton.jit
def finalize(ms, mt, ss, st, acc, s_label, OP: tl.constexpr):
    """The row's loss and its four statistics (the layout of row_math.h, kNumStats):
      token ops        {ms, log(ss + e^(s_y - ms)), log p_y, 0}
      forward KL       {ms, log ss, mt, log st}
      reverse KL/RKLD  {ms, log ss, mt, E_p[(s - ms) - (t - mt)]}
      UnDIAL           {ms, log ss, mt, log st~}
    ms, mt are the safe maxima; ss, st, acc the row's reduced sums (for the token ops ss
    leaves the label's own term out); s_label the student's scaled logit at the label."""
    if OP < FORWARD_KL:
        # log p_y = d - log(ss + e^d), d = s_y - ms <= 0. Near the top (p_y ~ 1) write it as
        # -log1p(ss e^-d): 1 - p_y of a memorised token is far below float32's resolution
        # of 1 and would otherwise round to 0.
        d = s_label - ms
        log_sum = tl.log(ss + tl.exp(d))
        logp = tl.where(-d < 60.0, -log1p(ss * tl.exp(-d)), d - log_sum)
        if OP == TOKEN_LOGPROB:
            value = logp
        else:
            value = -logp
        stat1 = log_sum
        stat2 = logp
        stat3 = tl.zeros_like(logp)
    else:
        stat1 = tl.log(ss)
        stat2 = mt
        if OP == FORWARD_KL:
            stat3 = tl.log(st)
            value = acc / st + (stat1 - stat3)
        elif OP == UNDIAL:
            stat3 = tl.log(st)
            value = stat1 - acc / st
        else:  # REVERSE_KL, RKLD
            stat3 = acc / ss
            value = stat3 + (tl.log(st) - stat1)
    return value, stat1, stat2, stat3


@triton.jit
def grad_at_label(stat2, g, OP: tl.constexpr):
    """The token ops' gradient at the label, g (1 - p_y) for token_logprob and its negative
    for cross_entropy, with 1 - p_y = -expm1(log p_y) from the saved log p_y: s_y - lse
    would round to 0 for memorised tokens, where p_y ~ 1. 0 for the other ops."""
    if OP == TOKEN_LOGPROB:
        out = -g * expm1(stat2)
    elif OP == CROSS_ENTROPY:
        out = g * expm1(stat2)
    else:
        out = 0.0 * g
    return out


@triton.jit
def grad_block(s, t, cols, y, stat0, stat1, stat2, stat3, g, label_grad, OP: tl.constexpr):
    """Gradient of the row loss w.r.t. the block's scaled student logits, times g (the
    upstream gradient, already divided by the temperature); label_grad from grad_at_label.
      token_logprob  -g p          cross_entropy  g p
      forward KL     g (p - q)     UnDIAL         g (p - q~)   (t already adjusted)
      reverse KL     g p (((s - ms) - (t - mt)) - E_p[...])    (= p (log p - log q - KL))"""
    p = tl.exp((s - stat0) - stat1)
    if OP == TOKEN_LOGPROB:
        out = tl.where(cols == y, label_grad, -g * p)
    elif OP == CROSS_ENTROPY:
        out = tl.where(cols == y, label_grad, g * p)
    elif OP == REVERSE_KL or OP == RKLD:
        out = tl.where(p == 0.0, 0.0, g * p * (((s - stat0) - (t - stat2)) - stat3))
    else:  # FORWARD_KL, UNDIAL
        out = g * (p - tl.exp((t - stat2) - stat3))
    return out
