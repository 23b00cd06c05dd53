"""Per-element and per-row math of every row op for the Triton kernels.

A port of csrc/common/row_math.h: the same formulas, the same max-shifted accumulators and
the same per-row statistics, applied to a block of a row instead of one element. The
CPU and CUDA kernels keep one running state per row (or per thread); here the maxima and
the sums are per lane (vectors of the block's width), so that the row loop reduces
nothing across lanes: the lanes are merged once, at the end of the row (merge_lanes).

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
JSD = tl.constexpr(6)  # generalised JSD, 0 < beta < 1, scaled to be continuous at 0 and 1

OP_CODES = {"token_logprob": 0, "cross_entropy": 1, "forward_kl": 2, "reverse_kl": 3, "rkld": 4, "undial": 5,
            "jsd": 6}
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
def tanh(x):
    """tanh(x) to a few ulp from expm1 (libdevice's has no interpreter version):
    -expm1(-2|x|) / (2 + expm1(-2|x|)) keeps the digits of a small x; +-inf give +-1."""
    e = expm1(-2.0 * tl.abs(x))
    th = -e / (2.0 + e)
    return tl.where(x < 0, -th, th)


@triton.jit
def load_block(s_row, t_row, t2_row, cols, live, y, inv_t, alpha, gamma, softcap, SOFTCAP: tl.constexpr,
               OP: tl.constexpr):
    """Student and teacher logits of one block, float32, divided by the temperature; the
    student softcapped first (SOFTCAP: c tanh(z / c), Gemma-2), the teacher built from its
    raw inputs first. Also the softcap's derivative 1 - tanh^2 (1 without a softcap), which
    the gradient w.r.t. the raw logit carries; a masked (-inf) logit stays masked. Lanes
    outside `live` read -inf (they add 0).

    RKLD:   o - alpha * relu(a - o); a masked original (o = -inf) stays masked, which also
            avoids -inf - -inf when both are masked. `d < 0 ? 0 : d` keeps a NaN a NaN.
    UnDIAL: t - gamma at the label (subtracted on load, never corrected afterwards)."""
    s = tl.load(s_row + cols, mask=live, other=NEG_INF).to(tl.float32)
    if SOFTCAP:
        th = tanh(s / softcap)
        dcap = tl.where(s == NEG_INF, 1.0, 1.0 - th * th)  # a masked logit passes through unchanged
        s = tl.where(s == NEG_INF, NEG_INF, softcap * th)  # masked logits (and lanes) stay masked
    else:
        dcap = tl.full(s.shape, 1.0, tl.float32)
    s = s * inv_t
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
    return s, t, dcap


@triton.jit
def _safe(m):
    """A maximum made safe to subtract: -inf (nothing but masked logits so far) shifts by 0,
    so that exp(-inf - 0) = 0 instead of exp(-inf - -inf) = NaN."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _lane_step(x, m):
    """One element per lane against the lane's running maximum m: (new maximum, its safe
    shift, the factor that moves the lane's sums to it, exp(x - new shift)), with a single
    exponential: where x raises the maximum the factor is exp(m - x) and x's own term is
    1, else the factor is 1 and the term exp(x - m). A NaN never raises it (it reaches the
    sums through its term); a +inf's term is NaN, as exp(inf - inf) is."""
    up = x > m
    m_new = tl.where(up, x, m)
    m0_new = _safe(m_new)
    e = tl.exp(tl.where(up, m - x, x - m0_new))
    return m_new, m0_new, tl.where(up, e, 1.0), tl.where(up, 1.0 + (x - m0_new), e)


@triton.jit
def online_update(s, t, cols, live, y, ms, mt, ss, st, acc, OP: tl.constexpr):
    """Merges one loaded block into the row's running state, lane by lane, and returns the
    new state. Every lane (one column of the block) keeps its own maxima, so that the row
    loop has no reduction across lanes (no shuffles, no barrier): the lanes are merged
    once, after the loop (merge_lanes).

    ms, mt are the lanes' running maxima of s and t; ss, st, acc per-lane sums shifted by
    their safe values (_safe):
      ss, st  sum exp(s - ms), sum exp(t - mt); the token ops leave the label's own term
              out of ss (ms still covers it), so that finalize keeps 1 - p_y's digits
      acc     the op's weighted sum, of logits shifted by their maxima so that two nearly
              equal distributions are not lost to cancellation:
                forward KL     sum exp(t - mt) ((t - mt) - (s - ms))
                UnDIAL         sum exp(t - mt) (s - ms)
                cross_entropy  sum (s - ms) over the lanes in `live`, st counting them
                               (label smoothing's mean of the logits)
              (reverse KL's and JSD's are taken by a second pass: see reverse_kl_block, jsd_terms)
    A zero weight contributes exactly 0 even where the other factor is infinite (masked
    logits: 0 * log 0 = 0). When a maximum grows, the sums are rescaled and acc's shifts
    moved: sum w (x - old) = sum w (x - new) + (new - old) sum w. One exponential per
    element and input, as before (_lane_step)."""
    ms0 = _safe(ms)
    ms, ms0_new, fs, es = _lane_step(s, ms)
    if OP < FORWARD_KL:
        ss = ss * fs + tl.where(cols == y, 0.0, es)
        if OP == CROSS_ENTROPY:
            acc = acc + (ms0 - ms0_new) * st + tl.where(live, s - ms0_new, 0.0)
            st = st + tl.where(live, 1.0, 0.0)
    else:
        mt0 = _safe(mt)
        mt, mt0_new, ft, et = _lane_step(t, mt)
        ss, st, acc = _moved(ss * fs, st * ft, acc, ft, ms0 - ms0_new, mt0 - mt0_new, OP)
        if OP == FORWARD_KL:
            acc += tl.where(et == 0.0, 0.0, et * ((t - mt0_new) - (s - ms0_new)))
        elif OP == UNDIAL:
            acc += tl.where(et == 0.0, 0.0, et * (s - ms0_new))
        ss += es
        st += et
    return ms, mt, ss, st, acc


@triton.jit
def _moved(ss, st, acc, ft, ds, dt, OP: tl.constexpr):
    """The teacher ops' acc moved to new shifts (ds, dt: old shift - new shift, <= 0), ss
    and st already rescaled (st by ft)."""
    if OP == FORWARD_KL:
        acc = acc * ft + (dt - ds) * st
    elif OP == UNDIAL:
        acc = acc * ft + ds * st
    return ss, st, acc


@triton.jit
def merge_lanes(ms, mt, ss, st, acc, OP: tl.constexpr):
    """The row's safe maxima and reduced sums from the lanes' (online_update): every lane
    moved to the row's maxima (one exponential per lane, once per row), then summed. A lane
    that saw only masked logits has nothing to move (its factor is 0: its sums are 0, or
    NaN, which stays NaN)."""
    ms0 = _safe(ms)
    ms0_row = _safe(tl.max(ms, 0))
    fs = tl.where(ms == NEG_INF, 0.0, tl.exp(ms0 - ms0_row))
    if OP < FORWARD_KL:
        mt0_row = ms0_row
        ss = ss * fs
        if OP == CROSS_ENTROPY:
            acc = acc + (ms0 - ms0_row) * st
    else:
        mt0 = _safe(mt)
        mt0_row = _safe(tl.max(mt, 0))
        ft = tl.where(mt == NEG_INF, 0.0, tl.exp(mt0 - mt0_row))
        ss, st, acc = _moved(ss * fs, st * ft, acc, ft, ms0 - ms0_row, mt0 - mt0_row, OP)
    return ms0_row, mt0_row, tl.sum(ss, 0), tl.sum(st, 0), tl.sum(acc, 0)


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
def finalize(ms, mt, ss, st, acc, s_label, smoothing, z_scale, OP: tl.constexpr):
    """The row's loss and statistics 1-3 (the layout of row_math.h, kNumStats = 5):
      token ops        {ms, log(ss + e^(s_y - ms)), log p_y, 0, 0}
      forward KL       {ms, log ss, mt, log st, 0}
      reverse KL/RKLD  {ms, log ss, mt, E_p[(s - ms) - (t - mt)], 0}
      UnDIAL           {ms, log ss, mt, log st~, 0}
      JSD              {ms, log ss, mt, log st, E_p[b]}   (loss and E_p[b]: jsd_terms)
    ms, mt are the safe maxima; ss, st, acc the row's reduced sums (for the token ops ss
    leaves the label's own term out); s_label the student's scaled logit at the label.
    cross_entropy adds label smoothing, (1 - eps) CE + eps (log sum e^(s - ms) - mean(s - ms)),
    and the z-loss z lse^2, each only when asked for (0 * inf would make a masked row NaN)."""
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
            if smoothing != 0.0:
                value = (1.0 - smoothing) * value + smoothing * (log_sum - acc / st)
            if z_scale != 0.0:
                value += z_scale * (ms + log_sum) * (ms + log_sum)
        stat1 = log_sum
        stat2 = logp
        stat3 = tl.zeros_like(logp)
    else:
        stat1 = tl.log(ss)
        stat2 = mt
        if OP == FORWARD_KL or OP == JSD:
            stat3 = tl.log(st)
            value = acc / st + (stat1 - stat3)  # JSD: replaced by its second pass
        elif OP == UNDIAL:
            stat3 = tl.log(st)
            value = stat1 - acc / st
        else:  # REVERSE_KL, RKLD
            stat3 = acc / ss
            value = stat3 + (tl.log(st) - stat1)
    return value, stat1, stat2, stat3


@triton.jit
def log_mix(x, g, gc):
    """log((1 - g) + g e^x) for 0 < g < 1 (gc = 1 - g), accurate relative to its own size
    (row_math.h, log_mix): log1p(g expm1(x)) where 1 + g expm1(x) >= 1/2, else (x < 0,
    g > 1/2) x + log1p(gc expm1(-x)), whose argument is positive; beyond |x| = 80 from the
    sum itself. Every branch's input is kept finite (the interpreter warns of inf - inf)."""
    xm = tl.minimum(tl.maximum(x, -80.0), 80.0)
    y = g * expm1(xm)
    # log1p above takes x >= 0: for -1/2 <= y < 0, log1p(y) = -log1p(-y / (1 + y))
    near = tl.where(y >= 0.0, log1p(tl.maximum(y, 0.0)), -log1p(tl.maximum(-y / (1.0 + y), 0.0)))
    far = xm + log1p(gc * expm1(-xm))
    big = x + tl.log(g + gc * tl.exp(-tl.maximum(x, 80.0)))
    small = tl.log(gc + g * tl.exp(tl.minimum(x, -80.0)))
    out = tl.where(y >= -0.5, near, tl.where(x < -80.0, small, far))
    return tl.where(x > 80.0, big, out)


@triton.jit
def jsd_terms(s, t, stat0, stat1, stat2, stat3, beta, one_minus_beta):
    """One block's shares of the scaled JSD and of E_p[b], b = log(p / m) / beta (row_math.h,
    jsd_terms): q log(q / m) / (1 - beta) + p b, and p b; zero probabilities give exactly 0."""
    lp = (s - stat0) - stat1
    lq = (t - stat2) - stat3
    p = tl.exp(lp)
    q = tl.exp(lq)
    d = tl.where((p == 0.0) & (q == 0.0), 0.0, lq - lp)
    pb = tl.where(p == 0.0, 0.0, -p * log_mix(d, beta, one_minus_beta) / beta)
    vq = tl.where(q == 0.0, 0.0, -q * log_mix(-d, one_minus_beta, beta) / one_minus_beta)
    return vq + pb, pb


@triton.jit
def grad_at_label(stat0, stat1, stat2, g, smoothing, smoothing_per_elem, z_scale, OP: tl.constexpr):
    """The token ops' gradient at the label, g (1 - p_y) for token_logprob and its negative
    for cross_entropy, with 1 - p_y = -expm1(log p_y) from the saved log p_y: s_y - lse
    would round to 0 for memorised tokens, where p_y ~ 1. cross_entropy adds label
    smoothing's eps (1 - 1/V) and the z-loss's 2 z lse p_y. 0 for the other ops."""
    if OP == TOKEN_LOGPROB:
        out = -g * expm1(stat2)
    elif OP == CROSS_ENTROPY:
        z = tl.where(z_scale == 0.0, 0.0, 2.0 * z_scale * (stat0 + stat1) * tl.exp(stat2))
        out = g * ((expm1(stat2) + (smoothing - smoothing_per_elem)) + z)
    else:
        out = 0.0 * g
    return out


@triton.jit
def grad_block(s, t, cols, y, stat0, stat1, stat2, stat3, stat4, g, label_grad, smoothing_per_elem, z_scale,
               beta, one_minus_beta, OP: tl.constexpr):
    """Gradient of the row loss w.r.t. the block's scaled student logits, times g (the
    upstream gradient, already divided by the temperature); label_grad from grad_at_label.
      token_logprob  -g p          cross_entropy  g (p (1 + 2 z lse) - eps / V)
      forward KL     g (p - q)     UnDIAL         g (p - q~)   (t already adjusted)
      reverse KL     g p (((s - ms) - (t - mt)) - E_p[...])    (= p (log p - log q - KL))
      JSD            g p (b - E_p[b]),  b = log(p / m) / beta"""
    p = tl.exp((s - stat0) - stat1)
    if OP == TOKEN_LOGPROB:
        out = tl.where(cols == y, label_grad, -g * p)
    elif OP == CROSS_ENTROPY:
        zf = tl.where(z_scale == 0.0, 1.0, 1.0 + 2.0 * z_scale * (stat0 + stat1))
        out = tl.where(cols == y, label_grad, g * (p * zf - smoothing_per_elem))
    elif OP == REVERSE_KL or OP == RKLD:
        out = tl.where(p == 0.0, 0.0, g * p * (((s - stat0) - (t - stat2)) - stat3))
    elif OP == JSD:
        lq = (t - stat2) - stat3
        d = tl.where((p == 0.0) & (lq == NEG_INF), 0.0, lq - ((s - stat0) - stat1))
        b = -log_mix(d, beta, one_minus_beta) / beta
        out = tl.where(p == 0.0, 0.0, g * p * (b - stat4))
    else:  # FORWARD_KL, UNDIAL
        out = g * (p - tl.exp((t - stat2) - stat3))
    return out


@triton.jit
def round_to_bf16(x):
    """x rounded to the nearest bfloat16, ties to even, as a float32 (its low 16 bits zero):
    the store's cast is then exact, so a bfloat16 gradient is rounded like torch's
    .to(torch.bfloat16) on the GPU and under the interpreter alike (Triton 3.9's
    interpreter truncates the cast). NaN stays NaN; overflow rounds to inf as torch does."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
