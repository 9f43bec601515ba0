/*
 * stats.c - the statistics of the experiment marts. See stats.h and
 * docs/experiments.md, which gives every formula with its source.
 *
 * Two rules run through this file. First, no NaN or infinity leaves it
 * except through the five distribution wrappers: every statistic is built
 * with val(), which turns a non-finite result into NULL, and every division
 * is guarded by the condition that makes the statistic defined. Second,
 * tails are computed on the side where they are small (upper tails with
 * lower_tail = 0, two-sided normal p-values as 2 Φ(-|z|)), so that a p-value
 * of 1e-300 is not rounded to 0 by a subtraction from 1.
 */
#include "aggregator/stats.h"

#include <float.h>
#include <math.h>

/* Rmath.h defines pt, qt, pnorm and friends as macros or plain external
 * names; it is included here only, after every other header. */
#define MATHLIB_STANDALONE 1
#include <Rmath.h>

/* ---------------------------------------------------------------------- */
/* Distribution wrappers                                                   */
/* ---------------------------------------------------------------------- */

/* Arguments outside the domain are answered here, so that they never reach
 * Rmath: its standalone build reports some conditions by printing to stdout,
 * which is the daemon's log. */
static int bad_df(double df)
{
    return isnan(df) || df <= 0;
}

static int bad_prob(double p)
{
    return isnan(p) || p < 0 || p > 1;
}

double stx_pnorm(double x)
{
    if (isnan(x))
        return NAN;
    return pnorm(x, 0.0, 1.0, 1, 0);
}

double stx_qnorm(double p)
{
    if (bad_prob(p))
        return NAN;
    return qnorm(p, 0.0, 1.0, 1, 0);
}

double stx_pt(double x, double df)
{
    if (isnan(x) || bad_df(df))
        return NAN;
    return pt(x, df, 1, 0);
}

double stx_qt(double p, double df)
{
    if (bad_prob(p) || bad_df(df))
        return NAN;
    return qt(p, df, 1, 0);
}

double stx_pchisq(double x, double df, int upper_tail)
{
    if (isnan(x) || bad_df(df))
        return NAN;
    return pchisq(x, df, upper_tail ? 0 : 1, 0);
}

/* Two-sided p-value of a standard normal statistic, from the small tail. */
static double p_two_sided_normal(double z)
{
    double p = 2.0 * pnorm(-fabs(z), 0.0, 1.0, 1, 0);
    return p > 1.0 ? 1.0 : p;
}

/* Two-sided p-value of a t statistic, from the small tail. */
static double p_two_sided_t(double t, double df)
{
    double p = 2.0 * pt(-fabs(t), df, 1, 0);
    return p > 1.0 ? 1.0 : p;
}

/* ---------------------------------------------------------------------- */
/* NULL-able values                                                        */
/* ---------------------------------------------------------------------- */

static const stx_val_t NUL = {0.0, 0};

static stx_val_t val(double v)
{
    stx_val_t r = NUL;
    if (isfinite(v)) {
        r.v = v;
        r.ok = 1;
    }
    return r;
}

/* ---------------------------------------------------------------------- */
/* Exact sums of squared cents                                             */
/*                                                                          */
/* Per-user revenue is below 2^63 cents, so its square is below 2^126 and  */
/* the sum over users fits 128 bits unless it holds billions of users at    */
/* the contract's maximum amount (which is reported as STX_EINVAL). The     */
/* arithmetic uses 32-bit limbs so that it is plain C11, without __int128.  */
/* ---------------------------------------------------------------------- */

/* r² for 0 <= r < 2^63 as (hi, lo). */
static void square_u63(uint64_t r, uint64_t *hi, uint64_t *lo)
{
    uint64_t a = r >> 32, b = r & 0xffffffffu;
    uint64_t bb = b * b;
    uint64_t mid = 2 * a * b; /* a < 2^31, so this stays below 2^64 */
    uint64_t l = bb + (mid << 32);
    uint64_t carry = l < bb;
    *lo = l;
    *hi = a * a + (mid >> 32) + carry;
}

/* (hi, lo) += (xh, xl); returns -1 on overflow, leaving the sum unchanged. */
static int add_u128(uint64_t *hi, uint64_t *lo, uint64_t xh, uint64_t xl)
{
    uint64_t l = *lo + xl;
    uint64_t carry = l < xl;
    uint64_t h = *hi + xh + carry;
    /* The addend is below 2^64 (xh < 2^62), so a wrap shows as a smaller h. */
    if (h < *hi)
        return -1;
    *hi = h;
    *lo = l;
    return 0;
}

/* (hi, lo) -= (xh, xl); returns -1 when the result would be negative. */
static int sub_u128(uint64_t *hi, uint64_t *lo, uint64_t xh, uint64_t xl)
{
    if (*hi < xh || (*hi == xh && *lo < xl))
        return -1;
    uint64_t borrow = *lo < xl;
    *lo -= xl;
    *hi -= xh + borrow;
    return 0;
}

static double u128_to_double(uint64_t hi, uint64_t lo)
{
    return (double)hi * 18446744073709551616.0 + (double)lo;
}

/*
 * n·Q − S² as a double, computed exactly in 192 bits and rounded once at
 * the end, for n, S below 2^63 and Q below 2^128. Returns -1 when the
 * difference is negative, which Cauchy–Schwarz rules out for real data.
 */
static int exact_var_numerator(uint64_t n, uint64_t qhi, uint64_t qlo, uint64_t s, double *out)
{
    uint32_t q[4] = {(uint32_t)qlo, (uint32_t)(qlo >> 32), (uint32_t)qhi, (uint32_t)(qhi >> 32)};
    uint32_t m[2] = {(uint32_t)n, (uint32_t)(n >> 32)};
    uint32_t sv[2] = {(uint32_t)s, (uint32_t)(s >> 32)};
    uint32_t nq[6] = {0}, ss[6] = {0};

    /* Schoolbook multiplication; every partial sum fits in 64 bits. */
    for (int i = 0; i < 2; i++) {
        uint64_t carry = 0;
        for (int j = 0; j < 4; j++) {
            uint64_t t = (uint64_t)m[i] * q[j] + nq[i + j] + carry;
            nq[i + j] = (uint32_t)t;
            carry = t >> 32;
        }
        nq[i + 4] = (uint32_t)carry;
    }
    for (int i = 0; i < 2; i++) {
        uint64_t carry = 0;
        for (int j = 0; j < 2; j++) {
            uint64_t t = (uint64_t)sv[i] * sv[j] + ss[i + j] + carry;
            ss[i + j] = (uint32_t)t;
            carry = t >> 32;
        }
        ss[i + 2] = (uint32_t)carry;
    }
    uint32_t d[6];
    uint64_t borrow = 0;
    for (int i = 0; i < 6; i++) {
        uint64_t a = nq[i], b = (uint64_t)ss[i] + borrow;
        borrow = a < b;
        d[i] = (uint32_t)(a - b);
    }
    if (borrow)
        return -1;
    double v = 0.0;
    for (int i = 5; i >= 0; i--)
        v = v * 4294967296.0 + (double)d[i];
    *out = v;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Sufficient statistics                                                    */
/* ---------------------------------------------------------------------- */

int stx_suff_apply(stx_suff_t *s, const stx_user_t *u, int sign)
{
    if (!s || !u || (sign != 1 && sign != -1))
        return STX_EINVAL;
    if (u->orders < 0 || u->revenue_cents < 0 || u->events < 0)
        return STX_EINVAL;

    stx_suff_t n = *s;
    int64_t d_conv = u->converted ? 1 : 0, d_cart = u->added_to_cart ? 1 : 0;
    int64_t d_chk = u->reached_checkout ? 1 : 0;
    uint64_t qh, ql;
    square_u63((uint64_t)u->revenue_cents, &qh, &ql);

    if (sign > 0) {
        /* Signed overflow is undefined behaviour, so test before adding. */
        if (n.users == INT64_MAX || n.orders > INT64_MAX - u->orders ||
            n.revenue_cents > INT64_MAX - u->revenue_cents || n.events > INT64_MAX - u->events)
            return STX_EINVAL;
        n.users++;
        n.converters += d_conv;
        n.orders += u->orders;
        n.revenue_cents += u->revenue_cents;
        n.events += u->events;
        n.carts += d_cart;
        n.checkouts += d_chk;
        if (add_u128(&n.revenue_sq_hi, &n.revenue_sq_lo, qh, ql) != 0)
            return STX_EINVAL;
    } else {
        n.users--;
        n.converters -= d_conv;
        n.orders -= u->orders;
        n.revenue_cents -= u->revenue_cents;
        n.events -= u->events;
        n.carts -= d_cart;
        n.checkouts -= d_chk;
        if (n.users < 0 || n.converters < 0 || n.orders < 0 || n.revenue_cents < 0 ||
            n.events < 0 || n.carts < 0 || n.checkouts < 0)
            return STX_EINVAL;
        if (sub_u128(&n.revenue_sq_hi, &n.revenue_sq_lo, qh, ql) != 0)
            return STX_EINVAL;
    }
    /* Derived from the exact words rather than accumulated, so that it is a
     * function of the set of users and not of the order of the updates. */
    n.revenue_sq = u128_to_double(n.revenue_sq_hi, n.revenue_sq_lo) / 10000.0;
    *s = n;
    return 0;
}

static int suff_valid(const stx_suff_t *s)
{
    return s && s->users >= 0 && s->converters >= 0 && s->converters <= s->users &&
           s->orders >= 0 && s->revenue_cents >= 0 && s->events >= 0 && s->carts >= 0 &&
           s->carts <= s->users && s->checkouts >= 0 && s->checkouts <= s->users &&
           isfinite(s->revenue_sq) && s->revenue_sq >= 0;
}

static double mean_revenue(const stx_suff_t *s)
{
    return (double)s->revenue_cents / 100.0 / (double)s->users;
}

/*
 * Sample variance of per-user revenue (currency units squared), NULL for
 * fewer than 2 users. From the exact words when they are set: exact except
 * for the final rounding, and exactly 0 when every user has the same
 * revenue. Otherwise from revenue_sq as (Σx² − n·mean²)/(n − 1); there the
 * subtraction loses everything below the rounding of Σx², so a result within
 * a few ulps of Σx² of zero, negative or not, is taken to be zero.
 */
static stx_val_t revenue_var(const stx_suff_t *s)
{
    if (s->users < 2)
        return NUL;
    double n = (double)s->users;
    if (s->revenue_sq_hi != 0 || s->revenue_sq_lo != 0) {
        double num;
        if (exact_var_numerator((uint64_t)s->users, s->revenue_sq_hi, s->revenue_sq_lo,
                                (uint64_t)s->revenue_cents, &num) != 0)
            return NUL;
        return val(num / (n * (n - 1.0)) / 10000.0);
    }
    double mean = mean_revenue(s);
    double num = s->revenue_sq - n * mean * mean;
    if (num <= 64.0 * DBL_EPSILON * s->revenue_sq)
        num = 0.0;
    return val(num / (n - 1.0));
}

int stx_variant_summary(const stx_suff_t *s, stx_variant_t *out)
{
    if (!out)
        return STX_EINVAL;
    out->conversion_rate = out->revenue_per_user = out->revenue_sd = NUL;
    out->events_per_user = out->cart_rate = out->checkout_rate = NUL;
    if (!suff_valid(s))
        return STX_EINVAL;
    if (s->users == 0)
        return 0;
    double n = (double)s->users;
    out->conversion_rate = val((double)s->converters / n);
    out->revenue_per_user = val(mean_revenue(s));
    stx_val_t var = revenue_var(s);
    if (var.ok)
        out->revenue_sd = val(sqrt(var.v));
    out->events_per_user = val((double)s->events / n);
    out->cart_rate = val((double)s->carts / n);
    out->checkout_rate = val((double)s->checkouts / n);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Comparison with the control                                             */
/* ---------------------------------------------------------------------- */

static void compare_clear(stx_compare_t *o)
{
    o->abs_lift = o->rel_lift = o->diff_ci_low = o->diff_ci_high = NUL;
    o->rel_ci_low = o->rel_ci_high = o->z = o->p_value = NUL;
    o->seq_ci_low = o->seq_ci_high = o->seq_p_value = o->chance_to_win = NUL;
    o->rpu_diff = o->rpu_ci_low = o->rpu_ci_high = o->rpu_p_value = NUL;
    o->rpu_t = o->rpu_df = NUL;
}

/*
 * The normal-mixture confidence sequence of §6 for a difference d whose
 * unpooled variance is se2 (> 0) after N = n_t + n_c observations.
 *
 * With a = Nρ² and A = σ²·2(Nρ² + 1)/(N²ρ²), the contract's half-width is
 * sqrt(A·L) with L = ln(sqrt(a + 1)/α), and ln E = d²/A − ln(a + 1)/2. So
 * 1/E < α ⇔ d²/A > L ⇔ |d| > half-width: the p-value and the interval are
 * one test. E is kept in logs because exp() of the exponent overflows for
 * large N long before the p-value stops being representable.
 *
 * Two floating-point computations of the same boundary can still disagree
 * in the last bit, and the contract promises that seq_p_value < α exactly
 * when the interval as written excludes 0. The interval's bounds are what
 * an analyst sees, so they decide, and a p-value on the wrong side of α (it
 * is then within rounding of α) is moved to the nearest double on the right
 * side.
 */
static void sequential(double d, double se2, double n_total, double alpha, double n_star,
                       stx_compare_t *o)
{
    double N = n_total;
    double sigma2 = N * se2;
    double l2a = -2.0 * log(alpha);
    double rho2 = (l2a + log(l2a + 1.0)) / n_star;
    double a = N * rho2;
    double A = sigma2 * 2.0 * (a + 1.0) / (N * N * rho2);
    double L = 0.5 * log1p(a) - log(alpha);
    double hw = sqrt(A * L);
    stx_val_t lo = val(d - hw), hi = val(d + hw);
    if (!lo.ok || !hi.ok)
        return;
    double log_e = d * d / A - 0.5 * log1p(a);
    double p = log_e > 0.0 ? exp(-log_e) : 1.0;
    if (!isfinite(p))
        return;
    int excludes = lo.v > 0.0 || hi.v < 0.0;
    if (excludes && !(p < alpha))
        p = nextafter(alpha, 0.0);
    else if (!excludes && p < alpha)
        p = alpha;
    o->seq_ci_low = lo;
    o->seq_ci_high = hi;
    o->seq_p_value = val(p);
}

/* Welch's t-test on per-user revenue (§6: rpu_*). */
static void welch(const stx_suff_t *t, const stx_suff_t *c, double alpha, stx_compare_t *o)
{
    double diff = mean_revenue(t) - mean_revenue(c);
    o->rpu_diff = val(diff);
    stx_val_t vt = revenue_var(t), vc = revenue_var(c);
    if (!o->rpu_diff.ok || !vt.ok || !vc.ok)
        return;
    double nt = (double)t->users, nc = (double)c->users;
    double st = vt.v / nt, sc = vc.v / nc;
    double se2 = st + sc;
    if (!(se2 > 0.0))
        return;
    /* Welch–Satterthwaite; the denominator is positive because se2 is. */
    double df = se2 * se2 / (st * st / (nt - 1.0) + sc * sc / (nc - 1.0));
    double se = sqrt(se2);
    double tstat = diff / se;
    if (!isfinite(df) || !(df > 0.0) || !isfinite(tstat))
        return;
    double q = qt(alpha / 2.0, df, 0, 0);
    stx_val_t lo = val(diff - q * se), hi = val(diff + q * se), p = val(p_two_sided_t(tstat, df));
    if (!lo.ok || !hi.ok || !p.ok)
        return;
    o->rpu_ci_low = lo;
    o->rpu_ci_high = hi;
    o->rpu_p_value = p;
    o->rpu_t = val(tstat);
    o->rpu_df = val(df);
}

int stx_compare(const stx_suff_t *t, const stx_suff_t *c, double alpha, double n_star,
                stx_compare_t *out)
{
    if (!out)
        return STX_EINVAL;
    compare_clear(out);
    if (!(alpha > 0.0 && alpha < 1.0) || !isfinite(n_star) || !(n_star > 0.0) || !suff_valid(t) ||
        !suff_valid(c))
        return STX_EINVAL;
    if (t->users == 0 || c->users == 0)
        return 0;

    double nt = (double)t->users, nc = (double)c->users;
    double pt_ = (double)t->converters / nt, pc = (double)c->converters / nc;
    double vt = pt_ * (1.0 - pt_), vc = pc * (1.0 - pc);
    double d = pt_ - pc;
    /* z* from the upper tail, accurate even for a very small alpha. */
    double zs = qnorm(alpha / 2.0, 0.0, 1.0, 0, 0);

    out->abs_lift = val(d);

    if (pc > 0.0) {
        out->rel_lift = val(pt_ / pc - 1.0);
        double rv = vt / (nt * pc * pc) + pt_ * pt_ * vc / (nc * pc * pc * pc * pc);
        if (out->rel_lift.ok && rv > 0.0) {
            double h = zs * sqrt(rv);
            out->rel_ci_low = val(out->rel_lift.v - h);
            out->rel_ci_high = val(out->rel_lift.v + h);
            if (!out->rel_ci_low.ok || !out->rel_ci_high.ok)
                out->rel_ci_low = out->rel_ci_high = NUL;
        }
    }

    double pbar = ((double)t->converters + (double)c->converters) / (nt + nc);
    double pooled = pbar * (1.0 - pbar) * (1.0 / nt + 1.0 / nc);
    if (pooled > 0.0) {
        out->z = val(d / sqrt(pooled));
        if (out->z.ok)
            out->p_value = val(p_two_sided_normal(out->z.v));
    }

    double se2 = vt / nt + vc / nc;
    if (se2 > 0.0) {
        double se = sqrt(se2);
        out->diff_ci_low = val(d - zs * se);
        out->diff_ci_high = val(d + zs * se);
        out->chance_to_win = val(pnorm(d / se, 0.0, 1.0, 1, 0));
        sequential(d, se2, nt + nc, alpha, n_star, out);
    }

    welch(t, c, alpha, out);
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Chi-square tests                                                        */
/* ---------------------------------------------------------------------- */

int stx_chi2_independence(const int64_t *converted, const int64_t *not_converted, int k,
                          stx_val_t *chi2, stx_val_t *p)
{
    if (!chi2 || !p)
        return STX_EINVAL;
    *chi2 = *p = NUL;
    if (k < 0 || (k > 0 && (!converted || !not_converted)))
        return STX_EINVAL;
    for (int i = 0; i < k; i++)
        if (converted[i] < 0 || not_converted[i] < 0)
            return STX_EINVAL;
    if (k < 2)
        return 0;

    double col1 = 0.0, col0 = 0.0;
    for (int i = 0; i < k; i++) {
        col1 += (double)converted[i];
        col0 += (double)not_converted[i];
    }
    double total = col1 + col0;
    if (!(col1 > 0.0) || !(col0 > 0.0))
        return 0;

    /* One degree of freedom exactly when the table is 2 x 2. */
    int yates = k == 2;
    double sum = 0.0;
    for (int i = 0; i < k; i++) {
        double row = (double)converted[i] + (double)not_converted[i];
        if (!(row > 0.0))
            return 0;
        const double obs[2] = {(double)converted[i], (double)not_converted[i]};
        const double col[2] = {col1, col0};
        for (int j = 0; j < 2; j++) {
            double e = row * col[j] / total;
            double dev = fabs(obs[j] - e);
            if (yates)
                dev -= dev < 0.5 ? dev : 0.5;
            sum += dev * dev / e;
        }
    }
    stx_val_t x = val(sum), pv = val(pchisq(sum, (double)(k - 1), 0, 0));
    if (x.ok && pv.ok) {
        *chi2 = x;
        *p = pv;
    }
    return 0;
}

int stx_srm(const int64_t *users, const double *weights, int k, stx_val_t *chi2, stx_val_t *p,
            int *detected)
{
    if (!chi2 || !p || !detected)
        return STX_EINVAL;
    *chi2 = *p = NUL;
    *detected = 0;
    if (k < 0 || (k > 0 && !users))
        return STX_EINVAL;
    double wsum = 0.0, total = 0.0;
    for (int i = 0; i < k; i++) {
        if (users[i] < 0)
            return STX_EINVAL;
        if (weights && !(isfinite(weights[i]) && weights[i] > 0.0))
            return STX_EINVAL;
        wsum += weights ? weights[i] : 1.0;
        total += (double)users[i];
    }
    if (k < 2 || !(total > 0.0) || !isfinite(wsum))
        return 0;

    double sum = 0.0;
    for (int i = 0; i < k; i++) {
        double e = total * (weights ? weights[i] : 1.0) / wsum;
        if (!(e > 0.0))
            return 0;
        double dev = (double)users[i] - e;
        sum += dev * dev / e;
    }
    stx_val_t x = val(sum), pv = val(pchisq(sum, (double)(k - 1), 0, 0));
    if (x.ok && pv.ok) {
        *chi2 = x;
        *p = pv;
        *detected = pv.v < STX_SRM_THRESHOLD;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Logistic regression                                                      */
/* ---------------------------------------------------------------------- */

/* The observations behind the fit: either 0/1 rows (y) or grouped rows
 * (successes of trials); one reader serves both so that they share every
 * line of the fit and give identical results. */
typedef struct obs {
    const double *y;
    const int64_t *succ, *trials;
} obs_t;

static void obs_row(const obs_t *o, size_t i, double *s, double *m)
{
    if (o->y) {
        *s = o->y[i];
        *m = 1.0;
    } else {
        *s = (double)o->succ[i];
        *m = (double)o->trials[i];
    }
}

/* log(1 + e^x) without overflow for large x or loss for very negative x. */
static double softplus(double x)
{
    return x > 0.0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

static double logistic(double x)
{
    if (x >= 0.0)
        return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static double dot(const double *x, const double *b, int p)
{
    double s = 0.0;
    for (int j = 0; j < p; j++)
        s += x[j] * b[j];
    return s;
}

/* −2 log-likelihood of the 0/1 observations at beta. */
static double deviance(const double *X, const obs_t *o, size_t n, int p, const double *beta)
{
    double dev = 0.0;
    for (size_t i = 0; i < n; i++) {
        double s, m;
        obs_row(o, i, &s, &m);
        if (m == 0.0)
            continue;
        double eta = dot(X + i * (size_t)p, beta, p);
        dev += 2.0 * (s * softplus(-eta) + (m - s) * softplus(eta));
    }
    return dev;
}

/* Score vector and Fisher information (full symmetric matrix) at beta. */
static void score_info(const double *X, const obs_t *o, size_t n, int p, const double *beta,
                       double *g, double *info)
{
    for (int j = 0; j < p; j++)
        g[j] = 0.0;
    for (int j = 0; j < p * p; j++)
        info[j] = 0.0;
    for (size_t i = 0; i < n; i++) {
        double s, m;
        obs_row(o, i, &s, &m);
        if (m == 0.0)
            continue;
        const double *x = X + i * (size_t)p;
        double mu = logistic(dot(x, beta, p));
        double r = s - m * mu, w = m * mu * (1.0 - mu);
        for (int j = 0; j < p; j++) {
            g[j] += x[j] * r;
            double wx = w * x[j];
            for (int k = 0; k <= j; k++)
                info[j * p + k] += wx * x[k];
        }
    }
    for (int j = 0; j < p; j++)
        for (int k = 0; k < j; k++)
            info[k * p + j] = info[j * p + k];
}

/*
 * In-place Cholesky factorisation A = L·Lᵀ (lower triangle of a). A pivot
 * that is not above 1e-12 of its column's original diagonal means the column
 * is, to working precision, a combination of the earlier ones: the
 * information matrix is singular and the coefficients are not identified.
 */
static int cholesky(double *a, int p)
{
    for (int j = 0; j < p; j++) {
        double diag = a[j * p + j];
        double s = diag;
        for (int k = 0; k < j; k++)
            s -= a[j * p + k] * a[j * p + k];
        if (!(diag > 0.0) || !(s > 1e-12 * diag) || !isfinite(s))
            return -1;
        double l = sqrt(s);
        a[j * p + j] = l;
        for (int i = j + 1; i < p; i++) {
            double t = a[i * p + j];
            for (int k = 0; k < j; k++)
                t -= a[i * p + k] * a[j * p + k];
            a[i * p + j] = t / l;
        }
    }
    return 0;
}

/* Solve L·Lᵀ x = b with the factor from cholesky(). */
static void chol_solve(const double *l, int p, const double *b, double *x)
{
    for (int i = 0; i < p; i++) {
        double t = b[i];
        for (int k = 0; k < i; k++)
            t -= l[i * p + k] * x[k];
        x[i] = t / l[i * p + i];
    }
    for (int i = p - 1; i >= 0; i--) {
        double t = x[i];
        for (int k = i + 1; k < p; k++)
            t -= l[k * p + i] * x[k];
        x[i] = t / l[i * p + i];
    }
}

/* Diagonal of (L·Lᵀ)⁻¹ = L⁻ᵀ·L⁻¹: entry j is the sum of squares of column j
 * of L⁻¹, which is the solution v of L·v = e_j (zero above row j). */
static void chol_inv_diag(const double *l, int p, double *diag)
{
    double v[STX_LOGIT_MAX_P];
    for (int j = 0; j < p; j++) {
        double sum = 0.0;
        for (int i = j; i < p; i++) {
            double t = i == j ? 1.0 : 0.0;
            for (int k = j; k < i; k++)
                t -= l[i * p + k] * v[k];
            v[i] = t / l[i * p + i];
            sum += v[i] * v[i];
        }
        diag[j] = sum;
    }
}

static void logit_clear(stx_logit_t *out, int p)
{
    out->p = p;
    out->n = 0;
    out->iterations = 0;
    out->converged = 0;
    out->deviance = 0.0;
    for (int j = 0; j < STX_LOGIT_MAX_P; j++)
        out->coef[j] = out->std_err[j] = out->z[j] = out->p_value[j] = 0.0;
}

/* Convergence thresholds, documented in stats.h and docs/experiments.md. */
#define STEP_TOL 1e-10
#define DEV_TOL 1e-12
#define SEPARATION_STEP 1e-3
#define SEPARATION_STALLS 3
#define MAX_HALVINGS 30

static int logit_fit(const double *X, const obs_t *o, size_t n, int p, int max_iter,
                     stx_logit_t *out)
{
    if (p > STX_LOGIT_MAX_P)
        return STX_ETOOBIG;
    if (n == 0 || p < 1 || !X)
        return STX_EINVAL;
    if (max_iter <= 0)
        max_iter = STX_LOGIT_MAX_ITER;

    double ones = 0.0, zeros = 0.0;
    for (size_t i = 0; i < n; i++) {
        for (int j = 0; j < p; j++)
            if (!isfinite(X[i * (size_t)p + j]))
                return STX_EINVAL;
        if (o->y) {
            if (o->y[i] != 0.0 && o->y[i] != 1.0)
                return STX_EINVAL;
        } else if (o->succ[i] < 0 || o->trials[i] < o->succ[i]) {
            return STX_EINVAL;
        }
        double s, m;
        obs_row(o, i, &s, &m);
        ones += s;
        zeros += m - s;
    }
    if (ones < 2.0 || zeros < 2.0)
        return STX_EFEW;

    double beta[STX_LOGIT_MAX_P] = {0}, trial[STX_LOGIT_MAX_P], g[STX_LOGIT_MAX_P];
    double delta[STX_LOGIT_MAX_P], info[STX_LOGIT_MAX_P * STX_LOGIT_MAX_P];
    double dev = deviance(X, o, n, p, beta);
    int converged = 0, stalled = 0, it;

    for (it = 1; it <= max_iter && !converged; it++) {
        score_info(X, o, n, p, beta, g, info);
        if (cholesky(info, p) != 0)
            return STX_ESINGULAR;
        chol_solve(info, p, g, delta);
        double maxd = 0.0;
        for (int j = 0; j < p; j++) {
            if (!isfinite(delta[j]))
                return STX_ENOCONV;
            if (fabs(delta[j]) > maxd)
                maxd = fabs(delta[j]);
        }

        /* A full Newton step almost always lowers the deviance from β = 0;
         * halving the step is the safeguard for when the quadratic model
         * overshoots. The tolerance lets rounding noise near the optimum
         * through. */
        double step = 1.0, new_dev;
        for (int h = 0;; h++) {
            for (int j = 0; j < p; j++)
                trial[j] = beta[j] + step * delta[j];
            new_dev = deviance(X, o, n, p, trial);
            if (isfinite(new_dev) && new_dev <= dev + DEV_TOL * (fabs(dev) + 0.1))
                break;
            if (h == MAX_HALVINGS)
                return STX_ENOCONV;
            step *= 0.5;
        }
        double rel = fabs(new_dev - dev) / (fabs(new_dev) + 0.1);
        for (int j = 0; j < p; j++)
            beta[j] = trial[j];
        dev = new_dev;

        /* The Newton step, not the (possibly halved) step taken, measures
         * the distance to the optimum. A settled deviance with a large step
         * is what separation looks like (a coefficient walks towards
         * infinity by about 1 per step while the likelihood approaches its
         * supremum), but also, once, what a nearly flat direction of a real
         * optimum can look like; Newton converges quadratically, so a real
         * optimum shows a small step within an iteration or two, and
         * separation never does. */
        if (maxd < STEP_TOL) {
            converged = 1;
        } else if (rel < DEV_TOL) {
            if (maxd < SEPARATION_STEP)
                converged = 1;
            else if (++stalled >= SEPARATION_STALLS)
                return STX_ESEPARATION;
        } else {
            stalled = 0;
        }
    }
    if (!converged)
        return STX_ENOCONV;

    /* Standard errors from the information at the optimum itself. */
    score_info(X, o, n, p, beta, g, info);
    if (cholesky(info, p) != 0)
        return STX_ESINGULAR;
    double diag[STX_LOGIT_MAX_P];
    chol_inv_diag(info, p, diag);
    for (int j = 0; j < p; j++) {
        double se = sqrt(diag[j]);
        double z = beta[j] / se;
        if (!isfinite(beta[j]) || !isfinite(se) || !(se > 0.0) || !isfinite(z))
            return STX_ESINGULAR;
        out->coef[j] = beta[j];
        out->std_err[j] = se;
        out->z[j] = z;
        out->p_value[j] = p_two_sided_normal(z);
    }
    out->n = (int64_t)(ones + zeros);
    out->iterations = it - 1;
    out->deviance = dev;
    out->converged = 1;
    return 0;
}

int stx_logit(const double *X, const double *y, size_t n, int p, int max_iter, stx_logit_t *out)
{
    if (!out)
        return STX_EINVAL;
    logit_clear(out, p);
    if (!y)
        return STX_EINVAL;
    obs_t o = {y, NULL, NULL};
    int rc = logit_fit(X, &o, n, p, max_iter, out);
    if (rc != 0)
        logit_clear(out, p);
    return rc;
}

int stx_logit_grouped(const double *X, const int64_t *successes, const int64_t *trials, size_t n,
                      int p, int max_iter, stx_logit_t *out)
{
    if (!out)
        return STX_EINVAL;
    logit_clear(out, p);
    if (!successes || !trials)
        return STX_EINVAL;
    obs_t o = {NULL, successes, trials};
    int rc = logit_fit(X, &o, n, p, max_iter, out);
    if (rc != 0)
        logit_clear(out, p);
    return rc;
}

const char *stx_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case STX_EINVAL:
        return "argument out of its domain";
    case STX_EFEW:
        return "fewer than 2 outcomes of either kind";
    case STX_ENOCONV:
        return "no convergence";
    case STX_ESINGULAR:
        return "singular information matrix";
    case STX_ESEPARATION:
        return "separation: the coefficients diverge";
    case STX_ETOOBIG:
        return "too many coefficients";
    default:
        return "unknown statistics error";
    }
}
