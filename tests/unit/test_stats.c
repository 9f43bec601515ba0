/*
 * test_stats.c - the statistics module against reference values computed
 * independently of it.
 *
 * Every reference value below names the expression that produced it. "R"
 * means R 4.2.2 (Debian r-base-core), printed with sprintf("%.17g", ...);
 * "mpmath" means Python's mpmath 1.3.0 at 50 significant digits, which
 * shares no code with R's nmath and so checks the library itself, not only
 * the way the wrappers call it. Where both were computed they agree to the
 * last digit shown. Values derived by hand ("analytic") say so.
 *
 * The statistics of §6 that no R function computes (the relative-lift delta
 * method, chance to win, the normal-mixture confidence sequence) are checked
 * against the contract's formulas typed into R separately from this C code;
 * the R functions used are spelled out at the test.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unit_cmocka.h"

#include "aggregator/stats.h"
#include "unit_rng.h"

/* |got - want| <= rel * |want|, with a message that shows both values. */
static void near_rel(double got, double want, double rel, const char *what)
{
    double err = fabs(got - want);
    if (!(err <= rel * fabs(want))) {
        print_error("%s: got %.17g want %.17g (rel err %.3g > %.3g)\n", what, got, want,
                    want != 0 ? err / fabs(want) : err, rel);
        fail();
    }
}

static void near_abs(double got, double want, double tol, const char *what)
{
    if (!(fabs(got - want) <= tol)) {
        print_error("%s: got %.17g want %.17g (abs tol %.3g)\n", what, got, want, tol);
        fail();
    }
}

static void val_rel(stx_val_t v, double want, double rel, const char *what)
{
    if (!v.ok) {
        print_error("%s: NULL, want %.17g\n", what, want);
        fail();
    }
    near_rel(v.v, want, rel, what);
}

static void is_null(stx_val_t v, const char *what)
{
    if (v.ok || v.v != 0.0) {
        print_error("%s: want NULL, got ok=%d v=%.17g\n", what, v.ok, v.v);
        fail();
    }
}

/* A non-NULL value must be finite: the module's promise that no NaN or
 * infinity escapes. */
static void sane(stx_val_t v, const char *what)
{
    if (v.ok && !isfinite(v.v)) {
        print_error("%s: ok but not finite\n", what);
        fail();
    }
    if (!v.ok && v.v != 0.0) {
        print_error("%s: NULL with v=%.17g\n", what, v.v);
        fail();
    }
}

static void sane_compare(const stx_compare_t *o)
{
    const stx_val_t *f = &o->abs_lift;
    size_t n = sizeof *o / sizeof *f;
    for (size_t i = 0; i < n; i++)
        sane(f[i], "compare field");
}

static stx_suff_t props(int64_t users, int64_t converters)
{
    stx_suff_t s;
    memset(&s, 0, sizeof s);
    s.users = users;
    s.converters = converters;
    return s;
}

static stx_compare_t compare(const stx_suff_t *t, const stx_suff_t *c, double alpha, double n_star)
{
    stx_compare_t o;
    assert_int_equal(stx_compare(t, c, alpha, n_star, &o), 0);
    sane_compare(&o);
    return o;
}

/* ---------------------------------------------------------------------- */
/* Distribution functions                                                  */
/* ---------------------------------------------------------------------- */

static void test_pnorm_qnorm(void **state)
{
    (void)state;
    /* R: pnorm(1.96) = 0.97500210485177963; mpmath: 0.97500210485177956379 */
    near_rel(stx_pnorm(1.96), 0.97500210485177963, 1e-15, "pnorm(1.96)");
    /* R: pnorm(-8.5) = 9.4795348222033192e-18; mpmath: 9.4795348222033183542e-18 */
    near_rel(stx_pnorm(-8.5), 9.4795348222033192e-18, 1e-14, "pnorm(-8.5)");
    /* Extreme tail. R: pnorm(-37) = 5.7255712225245771e-300;
     * mpmath: 5.7255712225245768227e-300. Must not be rounded to 0. */
    near_rel(stx_pnorm(-37), 5.7255712225245771e-300, 1e-13, "pnorm(-37)");
    /* R: pnorm(-38) = 0. The true value (mpmath: 2.8854283600687843e-316) is
     * subnormal; R's pnorm deliberately returns 0 below about -37.5193, and
     * so does libRmath, which is the same code. */
    assert_true(stx_pnorm(-38) == 0.0);
    /* R: qnorm(0.975) = 1.9599639845400536; mpmath: 1.9599639845400542355 */
    near_rel(stx_qnorm(0.975), 1.9599639845400536, 1e-15, "qnorm(0.975)");
    /* R: qnorm(1e-300) = -37.047096299361201; mpmath: -37.047096299361199237 */
    near_rel(stx_qnorm(1e-300), -37.047096299361201, 1e-15, "qnorm(1e-300)");
    /* R: qnorm(0.5) = 0 */
    near_abs(stx_qnorm(0.5), 0.0, 0.0, "qnorm(0.5)");
    /* R: qnorm(0) = -Inf, qnorm(1) = Inf */
    assert_true(isinf(stx_qnorm(0.0)) && stx_qnorm(0.0) < 0);
    assert_true(isinf(stx_qnorm(1.0)) && stx_qnorm(1.0) > 0);
}

static void test_pt_qt(void **state)
{
    (void)state;
    /* R: pt(2.5, 7.3) = 0.98017488266719976; mpmath: 0.9801748826671997642 */
    near_rel(stx_pt(2.5, 7.3), 0.98017488266719976, 1e-15, "pt(2.5, 7.3)");
    /* R: pt(-40, 3) = 1.719034039457927e-05; mpmath: 1.7190340394579264142e-05 */
    near_rel(stx_pt(-40, 3), 1.719034039457927e-05, 1e-14, "pt(-40, 3)");
    /* R: pt(-1e10, 2.5) = 7.1933971908317485e-26; mpmath: 7.1933971908317224147e-26 */
    near_rel(stx_pt(-1e10, 2.5), 7.1933971908317485e-26, 1e-13, "pt(-1e10, 2.5)");
    /* Extreme upper quantile. R: qt(0.9999999, 3) = 222.57159098625121;
     * mpmath (root of pt at the double nearest 0.9999999): 222.57159098625124254 */
    near_rel(stx_qt(0.9999999, 3), 222.57159098625121, 1e-12, "qt(0.9999999, 3)");
    /* R: qt(0.975, 12.7) = 2.1655677313687249; mpmath: 2.1655677313687246667 */
    near_rel(stx_qt(0.975, 12.7), 2.1655677313687249, 1e-14, "qt(0.975, 12.7)");
    /* R: qt(1e-12, 4) = -1316.0727465592572; mpmath: -1316.0727465592565424 */
    near_rel(stx_qt(1e-12, 4), -1316.0727465592572, 1e-13, "qt(1e-12, 4)");
}

static void test_pchisq(void **state)
{
    (void)state;
    /* R: pchisq(3.84, 1) = 0.94995647875129474; mpmath: 0.94995647875129489681 */
    near_rel(stx_pchisq(3.84, 1, 0), 0.94995647875129474, 1e-14, "pchisq(3.84, 1)");
    /* R: pchisq(5.5, 2, lower=FALSE) = 0.06392786120670757;
     * mpmath: 0.063927861206707572702 (= exp(-2.75)) */
    near_rel(stx_pchisq(5.5, 2, 1), 0.06392786120670757, 1e-14, "pchisq(5.5, 2, upper)");
    /* Extreme tail. R: pchisq(1300, 3, lower=FALSE) = 1.4717437106980104e-281;
     * mpmath: 1.4717437106980103396e-281. 1 - pchisq(1300, 3) would be 0. */
    near_rel(stx_pchisq(1300, 3, 1), 1.4717437106980104e-281, 1e-13, "pchisq(1300, 3, upper)");
    /* R: pchisq(2000, 3, lower=FALSE) = 0. The true value (mpmath:
     * 1.8121332982822999804e-433) is below the smallest double. */
    assert_true(stx_pchisq(2000, 3, 1) == 0.0);
    assert_true(stx_pchisq(2000, 3, 0) == 1.0);
}

static void test_wrapper_domain(void **state)
{
    (void)state;
    assert_true(isnan(stx_pt(1.0, 0.0)));
    assert_true(isnan(stx_pt(1.0, -2.0)));
    assert_true(isnan(stx_qt(1.5, 3.0)));
    assert_true(isnan(stx_qt(0.5, NAN)));
    assert_true(isnan(stx_qnorm(-0.1)));
    assert_true(isnan(stx_pnorm(NAN)));
    assert_true(isnan(stx_pchisq(1.0, 0.0, 1)));
    assert_true(isnan(stx_pchisq(NAN, 2.0, 0)));
}

/* ---------------------------------------------------------------------- */
/* Proportions                                                              */
/* ---------------------------------------------------------------------- */

static void test_two_proportions_vs_prop_test(void **state)
{
    (void)state;
    stx_suff_t t = props(1000, 120), c = props(1000, 100);
    stx_compare_t o = compare(&t, &c, 0.05, 5000);
    val_rel(o.abs_lift, 0.02, 1e-13, "abs_lift");
    /* R: prop.test(c(120, 100), c(1000, 1000), correct = FALSE):
     * X-squared = 2.0429009193054135, p-value = 0.1529177818639457,
     * conf.int = (-0.0074114819980199385, 0.047411481998019922), the
     * unpooled Wald interval. z² = X-squared; the sign follows t - c. */
    assert_true(o.z.ok && o.z.v > 0);
    near_rel(o.z.v * o.z.v, 2.0429009193054135, 1e-13, "z^2");
    val_rel(o.p_value, 0.1529177818639457, 1e-12, "p_value");
    val_rel(o.diff_ci_low, -0.0074114819980199385, 1e-12, "diff_ci_low");
    val_rel(o.diff_ci_high, 0.047411481998019922, 1e-13, "diff_ci_high");
    /* The §6 delta method typed into R: pt=.12; pc=.1; r=pt/pc-1;
     * se=sqrt(pt*(1-pt)/(1000*pc^2)+pt^2*pc*(1-pc)/(1000*pc^4));
     * r +- qnorm(0.975)*se -> 0.19999999999999996, -0.10058461614448233,
     * 0.50058461614448224 */
    val_rel(o.rel_lift, 0.19999999999999996, 1e-13, "rel_lift");
    val_rel(o.rel_ci_low, -0.10058461614448233, 1e-12, "rel_ci_low");
    val_rel(o.rel_ci_high, 0.50058461614448224, 1e-13, "rel_ci_high");
    /* R: pnorm((0.12-0.1)/sqrt(0.12*0.88/1000+0.1*0.9/1000)) = 0.92364599490306099 */
    val_rel(o.chance_to_win, 0.92364599490306099, 1e-14, "chance_to_win");

    /* R: prop.test(c(37, 52), c(400, 610), correct = FALSE): X-squared =
     * 0.15820800106557753, p-value = 0.69081175378483028, conf.int =
     * (-0.028763079069804208, 0.043271275791115692) */
    t = props(400, 37);
    c = props(610, 52);
    o = compare(&t, &c, 0.05, 5000);
    near_rel(o.z.v * o.z.v, 0.15820800106557753, 1e-12, "z^2 (2)");
    val_rel(o.p_value, 0.69081175378483028, 1e-13, "p_value (2)");
    val_rel(o.diff_ci_low, -0.028763079069804208, 1e-12, "diff_ci_low (2)");
    val_rel(o.diff_ci_high, 0.043271275791115692, 1e-12, "diff_ci_high (2)");

    /* Swapping the arms flips the sign of z and of the lift only. */
    stx_compare_t r = compare(&c, &t, 0.05, 5000);
    near_rel(r.z.v, -o.z.v, 1e-15, "z antisymmetric");
    near_rel(r.p_value.v, o.p_value.v, 1e-15, "p symmetric");
}

static void test_two_proportions_extreme_tail(void **state)
{
    (void)state;
    /* R: prop.test(c(15000, 10000), c(1e5, 1e5), correct = FALSE):
     * X-squared = 1142.8571428571429, p-value = 1.6006247749068634e-250.
     * 2(1 - Φ(|z|)) computed literally would be 0. */
    stx_suff_t t = props(100000, 15000), c = props(100000, 10000);
    stx_compare_t o = compare(&t, &c, 0.05, 5000);
    near_rel(o.z.v * o.z.v, 1142.8571428571429, 1e-13, "z^2");
    val_rel(o.p_value, 1.6006247749068634e-250, 1e-11, "p_value");
    /* R: prop.test(c(2600, 2000), c(5000, 5000), correct = FALSE):
     * X-squared = 144.92753623188406, p-value = 2.2274263772982018e-33 */
    t = props(5000, 2600);
    c = props(5000, 2000);
    o = compare(&t, &c, 0.05, 5000);
    val_rel(o.p_value, 2.2274263772982018e-33, 1e-12, "p_value (2)");
    /* The sequential p-value in the same tail, from the seqci() R function
     * of test_seq_vs_formula: seqci(2600, 5000, 2000, 5000) =
     * 0.089705294534849864, 0.15029470546515014, 3.7395724507419809e-30.
     * E itself is exp(67.8); it is kept in logs so it cannot overflow. */
    val_rel(o.seq_ci_low, 0.089705294534849864, 1e-13, "seq low (2)");
    val_rel(o.seq_ci_high, 0.15029470546515014, 1e-13, "seq high (2)");
    val_rel(o.seq_p_value, 3.7395724507419809e-30, 1e-11, "seq p (2)");
    /* Far enough out the p-value underflows to 0, a number, not NaN. */
    t = props(1000000, 200000);
    c = props(1000000, 100000);
    o = compare(&t, &c, 0.05, 5000);
    assert_true(o.seq_p_value.ok && o.seq_p_value.v == 0.0);
    assert_true(o.p_value.ok && o.p_value.v == 0.0);
}

/* ---------------------------------------------------------------------- */
/* Revenue: Welch's t-test from sufficient statistics                      */
/* ---------------------------------------------------------------------- */

static const double REV_T[] = {0, 0, 12.5, 0, 30, 0, 7.25, 0, 0, 99.99, 0, 45.1, 0, 0, 18.4};
static const double REV_C[] = {0, 5, 0, 0, 0, 22.75, 0, 0, 12.3, 0, 0, 0};
#define NT (sizeof REV_T / sizeof REV_T[0])
#define NC (sizeof REV_C / sizeof REV_C[0])

/* The sufficient statistics as a caller that keeps only doubles would: the
 * exact words stay zero, so the revenue_sq path is exercised. */
static stx_suff_t suff_from_doubles(const double *x, size_t n)
{
    stx_suff_t s;
    memset(&s, 0, sizeof s);
    for (size_t i = 0; i < n; i++) {
        int64_t cents = llround(x[i] * 100.0);
        double units = (double)cents / 100.0;
        s.users++;
        s.converters += cents > 0;
        s.orders += cents > 0;
        s.revenue_cents += cents;
        s.revenue_sq += units * units;
    }
    return s;
}

/* The same through stx_suff_apply, which keeps the exact words. */
static stx_suff_t suff_from_apply(const double *x, size_t n)
{
    stx_suff_t s;
    memset(&s, 0, sizeof s);
    for (size_t i = 0; i < n; i++) {
        stx_user_t u = {0};
        u.revenue_cents = llround(x[i] * 100.0);
        u.converted = u.revenue_cents > 0;
        u.orders = u.converted;
        u.events = 3;
        assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    }
    return s;
}

static void check_welch(const stx_suff_t *t, const stx_suff_t *c, double rel)
{
    /* R: rt <- c(0, 0, 12.5, 0, 30, 0, 7.25, 0, 0, 99.99, 0, 45.1, 0, 0, 18.4);
     *    rc <- c(0, 5, 0, 0, 0, 22.75, 0, 0, 12.3, 0, 0, 0);
     *    t.test(rt, rc, var.equal = FALSE):
     *    t = 1.4804307067792652, df = 16.338941329700912,
     *    p-value = 0.1577831330347054,
     *    conf.int = (-4.6727651228240843, 26.429765122824083),
     *    mean(rt) - mean(rc) = 10.878499999999999 */
    stx_compare_t o = compare(t, c, 0.05, 5000);
    val_rel(o.rpu_diff, 10.878499999999999, rel, "rpu_diff");
    val_rel(o.rpu_t, 1.4804307067792652, rel, "rpu_t");
    val_rel(o.rpu_df, 16.338941329700912, rel, "rpu_df");
    val_rel(o.rpu_p_value, 0.1577831330347054, rel, "rpu_p_value");
    val_rel(o.rpu_ci_low, -4.6727651228240843, rel, "rpu_ci_low");
    val_rel(o.rpu_ci_high, 26.429765122824083, rel, "rpu_ci_high");
    /* R: t.test(rt, rc, var.equal = FALSE, conf.level = 0.9)$conf.int =
     *    (-1.9342989066090268, 23.691298906609024) */
    o = compare(t, c, 0.10, 5000);
    val_rel(o.rpu_ci_low, -1.9342989066090268, rel, "rpu_ci_low 90%");
    val_rel(o.rpu_ci_high, 23.691298906609024, rel, "rpu_ci_high 90%");

    /* R: sd(rt) = 27.318181752922616, sd(rc) = 7.1362431228967331,
     *    mean(rt) = 14.215999999999999 */
    stx_variant_t v;
    assert_int_equal(stx_variant_summary(t, &v), 0);
    val_rel(v.revenue_sd, 27.318181752922616, rel, "sd(rt)");
    val_rel(v.revenue_per_user, 14.215999999999999, 1e-15, "mean(rt)");
    assert_int_equal(stx_variant_summary(c, &v), 0);
    val_rel(v.revenue_sd, 7.1362431228967331, rel, "sd(rc)");
}

static void test_welch_vs_t_test(void **state)
{
    (void)state;
    stx_suff_t t = suff_from_doubles(REV_T, NT), c = suff_from_doubles(REV_C, NC);
    check_welch(&t, &c, 1e-12);
    t = suff_from_apply(REV_T, NT);
    c = suff_from_apply(REV_C, NC);
    check_welch(&t, &c, 1e-12);
}

/* ---------------------------------------------------------------------- */
/* Variant summary and sufficient statistics                               */
/* ---------------------------------------------------------------------- */

static void test_variant_summary(void **state)
{
    (void)state;
    stx_suff_t s = {.users = 8,
                    .converters = 2,
                    .orders = 3,
                    .revenue_cents = 5000,
                    .revenue_sq = 30.0 * 30.0 + 20.0 * 20.0,
                    .events = 52,
                    .carts = 4,
                    .checkouts = 3};
    stx_variant_t v;
    assert_int_equal(stx_variant_summary(&s, &v), 0);
    /* Analytic: 2/8, 50/8, 52/8, 4/8, 3/8; R: sd(c(30, 20, 0, 0, 0, 0, 0, 0))
     * = 11.877349391654208 */
    val_rel(v.conversion_rate, 0.25, 0, "conversion_rate");
    val_rel(v.revenue_per_user, 6.25, 0, "revenue_per_user");
    val_rel(v.events_per_user, 6.5, 0, "events_per_user");
    val_rel(v.cart_rate, 0.5, 0, "cart_rate");
    val_rel(v.checkout_rate, 0.375, 0, "checkout_rate");
    val_rel(v.revenue_sd, 11.877349391654208, 1e-14, "revenue_sd");

    /* One user: every rate, but no sample SD. */
    stx_suff_t one = {.users = 1,
                      .converters = 1,
                      .orders = 1,
                      .revenue_cents = 999,
                      .revenue_sq = 9.99 * 9.99,
                      .events = 4,
                      .carts = 1,
                      .checkouts = 1};
    assert_int_equal(stx_variant_summary(&one, &v), 0);
    val_rel(v.revenue_per_user, 9.99, 1e-15, "rpu one");
    is_null(v.revenue_sd, "revenue_sd n=1");

    /* No users: everything NULL. */
    stx_suff_t none;
    memset(&none, 0, sizeof none);
    assert_int_equal(stx_variant_summary(&none, &v), 0);
    is_null(v.conversion_rate, "conversion_rate n=0");
    is_null(v.revenue_per_user, "rpu n=0");
    is_null(v.revenue_sd, "sd n=0");
    is_null(v.events_per_user, "epu n=0");
    is_null(v.cart_rate, "cart n=0");
    is_null(v.checkout_rate, "checkout n=0");

    /* Inconsistent input: EINVAL and all NULL, never NaN. */
    stx_suff_t bad = s;
    bad.converters = 9;
    assert_int_equal(stx_variant_summary(&bad, &v), STX_EINVAL);
    is_null(v.conversion_rate, "bad");
    bad = s;
    bad.revenue_sq = NAN;
    assert_int_equal(stx_variant_summary(&bad, &v), STX_EINVAL);
    is_null(v.revenue_sd, "bad sq");
}

static void test_zero_variance_double_path(void **state)
{
    (void)state;
    /* 1000 users who all spent 12.34: (Σx² − n·mean²) is rounding noise
     * around 0 in doubles; the SD must be exactly 0, and Welch NULL. */
    stx_suff_t a;
    memset(&a, 0, sizeof a);
    for (int i = 0; i < 1000; i++) {
        a.users++;
        a.converters++;
        a.revenue_cents += 1234;
        a.revenue_sq += 12.34 * 12.34;
    }
    stx_variant_t v;
    assert_int_equal(stx_variant_summary(&a, &v), 0);
    val_rel(v.revenue_sd, 0.0, 0.0, "sd of constant revenue");
    stx_compare_t o = compare(&a, &a, 0.05, 5000);
    val_rel(o.rpu_diff, 0.0, 0.0, "rpu_diff");
    is_null(o.rpu_p_value, "rpu_p zero variance");
    is_null(o.rpu_ci_low, "rpu_ci zero variance");
    is_null(o.rpu_ci_high, "rpu_ci zero variance");
}

static void test_exact_variance(void **state)
{
    (void)state;
    /* 10^6 users at 1,000,000.00 and one more cent for one of them. Analytic:
     * the sample variance of n - 1 values a and one value a + δ is δ²/n =
     * 0.01² / 10^6 = 1e-10 (R's var() gets 1.0000000018640182e-10 because
     * 1000000.01 is not a double; the exact words work in cents). In doubles
     * Σx² ≈ 1e18 has an ulp of 128, so only the exact path can see this. */
    stx_suff_t s;
    memset(&s, 0, sizeof s);
    stx_user_t u = {.revenue_cents = 100000000, .converted = 1, .orders = 1};
    for (int i = 0; i < 999999; i++)
        assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    u.revenue_cents++;
    assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    stx_variant_t v;
    assert_int_equal(stx_variant_summary(&s, &v), 0);
    val_rel(v.revenue_sd, 1e-5, 1e-12, "sd from exact words");

    /* Equal revenues: exactly zero, not a rounding residue. */
    memset(&s, 0, sizeof s);
    u.revenue_cents = 1234;
    for (int i = 0; i < 1000; i++)
        assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    assert_int_equal(stx_variant_summary(&s, &v), 0);
    val_rel(v.revenue_sd, 0.0, 0.0, "sd exact zero");

    /* The contract's largest amount, 1e12 (10^14 cents), squared is 1e28:
     * the exact words carry it (and R: sd(c(1e12, 0)) = 707106781186.54749). */
    memset(&s, 0, sizeof s);
    u.revenue_cents = 100000000000000LL;
    assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    u.revenue_cents = 0;
    assert_int_equal(stx_suff_apply(&s, &u, 1), 0);
    assert_int_equal(stx_variant_summary(&s, &v), 0);
    val_rel(v.revenue_sd, 707106781186.54749, 1e-15, "sd of (1e12, 0)");
}

static void test_suff_apply_order_independent(void **state)
{
    (void)state;
    /* The same final set of users reached through different histories of
     * additions and retractions gives bit-identical sufficient statistics. */
    stx_user_t users[50];
    uint64_t r = 12345;
    for (int i = 0; i < 50; i++) {
        r = r * 6364136223846793005ULL + 1442695040888963407ULL;
        memset(&users[i], 0, sizeof users[i]);
        users[i].revenue_cents = (int64_t)(r >> 40) % 100000;
        users[i].converted = users[i].revenue_cents % 3 != 0;
        users[i].orders = users[i].converted ? 1 + i % 3 : 0;
        users[i].events = i % 17;
        users[i].added_to_cart = i % 2;
        users[i].reached_checkout = i % 4 == 0;
    }
    stx_suff_t a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    for (int i = 0; i < 50; i++)
        assert_int_equal(stx_suff_apply(&a, &users[i], 1), 0);
    /* b: reverse order, with a detour through an outdated row per user. */
    for (int i = 49; i >= 0; i--) {
        stx_user_t old = users[i];
        old.revenue_cents = old.revenue_cents / 2 + 7;
        old.events += 5;
        assert_int_equal(stx_suff_apply(&b, &old, 1), 0);
        assert_int_equal(stx_suff_apply(&b, &old, -1), 0);
        assert_int_equal(stx_suff_apply(&b, &users[i], 1), 0);
    }
    assert_memory_equal(&a, &b, sizeof a);
    assert_int_equal(a.users, 50);

    /* A retraction that would go negative is refused and changes nothing. */
    stx_suff_t empty, before;
    memset(&empty, 0, sizeof empty);
    before = empty;
    assert_int_equal(stx_suff_apply(&empty, &users[1], -1), STX_EINVAL);
    assert_memory_equal(&empty, &before, sizeof empty);
    stx_user_t neg = {.revenue_cents = -1};
    assert_int_equal(stx_suff_apply(&a, &neg, 1), STX_EINVAL);
    assert_int_equal(stx_suff_apply(&a, &users[0], 2), STX_EINVAL);
}

/* ---------------------------------------------------------------------- */
/* Chi-square tests                                                         */
/* ---------------------------------------------------------------------- */

static void test_chi2_independence(void **state)
{
    (void)state;
    stx_val_t x, p;
    /* R: chisq.test(matrix(c(120, 880, 100, 900), nrow = 2, byrow = TRUE),
     *    correct = TRUE): X-squared = 1.8437180796731358,
     *    p-value = 0.17451579008210202 */
    int64_t c2[] = {120, 100}, n2[] = {880, 900};
    assert_int_equal(stx_chi2_independence(c2, n2, 2, &x, &p), 0);
    val_rel(x, 1.8437180796731358, 1e-12, "chi2 2x2 yates");
    val_rel(p, 0.17451579008210202, 1e-12, "p 2x2 yates");

    /* Every |O - E| below 0.5: Yates reduces each by itself (scipy's
     * min(0.5, |O - E|)), so the statistic is 0. R: chisq.test(matrix(c(10,
     * 20, 10, 21), nrow = 2, byrow = TRUE)) gives X-squared =
     * 3.0793091301624811e-31 (rounding residue), p-value = 0.99999999999999956 */
    int64_t cs[] = {10, 10}, ns[] = {20, 21};
    assert_int_equal(stx_chi2_independence(cs, ns, 2, &x, &p), 0);
    near_abs(x.v, 0.0, 1e-20, "chi2 small deviation");
    val_rel(p, 0.99999999999999956, 1e-14, "p small deviation");

    /* 3 x 2 has two degrees of freedom: no correction. R: chisq.test(matrix(
     * c(120, 880, 100, 900, 140, 860), ncol = 2, byrow = TRUE)):
     * X-squared = 7.5757575757575761, p-value = 0.02264358278653442 */
    int64_t c3[] = {120, 100, 140}, n3[] = {880, 900, 860};
    assert_int_equal(stx_chi2_independence(c3, n3, 3, &x, &p), 0);
    val_rel(x, 7.5757575757575761, 1e-12, "chi2 3x2");
    val_rel(p, 0.02264358278653442, 1e-12, "p 3x2");

    /* Small but non-zero expected counts are still defined. R: chisq.test(
     * matrix(c(3, 40, 0, 2, 0, 50), ncol = 2, byrow = TRUE)):
     * X-squared = 3.746208291203236, p-value = 0.1536459813066936 */
    int64_t cz[] = {3, 0, 0}, nz[] = {40, 2, 50};
    assert_int_equal(stx_chi2_independence(cz, nz, 3, &x, &p), 0);
    val_rel(x, 3.746208291203236, 1e-12, "chi2 zero cell");
    val_rel(p, 0.1536459813066936, 1e-12, "p zero cell");

    /* NULL: nobody converted (a zero column), a variant without users (a
     * zero row), fewer than two variants. */
    int64_t c0[] = {0, 0}, n0[] = {50, 60};
    assert_int_equal(stx_chi2_independence(c0, n0, 2, &x, &p), 0);
    is_null(x, "no converters");
    is_null(p, "no converters p");
    int64_t ce[] = {5, 0}, ne[] = {50, 0};
    assert_int_equal(stx_chi2_independence(ce, ne, 2, &x, &p), 0);
    is_null(x, "empty row");
    assert_int_equal(stx_chi2_independence(c2, n2, 1, &x, &p), 0);
    is_null(x, "k = 1");
    int64_t cn[] = {-1, 4};
    assert_int_equal(stx_chi2_independence(cn, n2, 2, &x, &p), STX_EINVAL);
    is_null(x, "negative");
}

static void test_srm(void **state)
{
    (void)state;
    stx_val_t x, p;
    int det = -1;
    /* R: chisq.test(c(5000, 5200), p = c(0.5, 0.5)): X-squared =
     * 3.9215686274509802, p-value = 0.047670380656161498 (not an SRM) */
    int64_t u1[] = {5000, 5200};
    assert_int_equal(stx_srm(u1, NULL, 2, &x, &p, &det), 0);
    val_rel(x, 3.9215686274509802, 1e-13, "srm1 chi2");
    val_rel(p, 0.047670380656161498, 1e-13, "srm1 p");
    assert_int_equal(det, 0);

    /* R: chisq.test(c(3300, 3350, 3400), p = c(1, 1, 1)/3): X-squared =
     * 1.4925373134328359, p-value = 0.47413240696029374 */
    int64_t u2[] = {3300, 3350, 3400};
    double w2[] = {1, 1, 1};
    assert_int_equal(stx_srm(u2, w2, 3, &x, &p, &det), 0);
    val_rel(x, 1.4925373134328359, 1e-13, "srm2 chi2");
    val_rel(p, 0.47413240696029374, 1e-13, "srm2 p");

    /* Weights need not sum to 1. R: chisq.test(c(500, 260, 240), p = c(2, 1,
     * 1), rescale.p = TRUE): X-squared = 0.8, p-value = 0.67032004603563933 */
    int64_t u3[] = {500, 260, 240};
    double w3[] = {2, 1, 1};
    assert_int_equal(stx_srm(u3, w3, 3, &x, &p, &det), 0);
    val_rel(x, 0.80000000000000004, 1e-13, "srm3 chi2");
    val_rel(p, 0.67032004603563933, 1e-13, "srm3 p");
    assert_int_equal(det, 0);

    /* R: chisq.test(c(5000, 4000), p = c(0.5, 0.5)): X-squared =
     * 111.11111111111111, p-value = 5.594557236191515e-26 (an SRM) */
    int64_t u4[] = {5000, 4000};
    assert_int_equal(stx_srm(u4, NULL, 2, &x, &p, &det), 0);
    val_rel(x, 111.11111111111111, 1e-13, "srm4 chi2");
    val_rel(p, 5.594557236191515e-26, 1e-12, "srm4 p");
    assert_int_equal(det, 1);

    /* Extreme tail. R: chisq.test(c(50000, 40000), p = c(0.5, 0.5)):
     * X-squared = 1111.1111111111111, p-value = 1.2704546240403947e-243 */
    int64_t u5[] = {50000, 40000};
    assert_int_equal(stx_srm(u5, NULL, 2, &x, &p, &det), 0);
    val_rel(p, 1.2704546240403947e-243, 1e-11, "srm5 p");
    assert_int_equal(det, 1);

    /* NULL and never detected: one variant, no users. */
    assert_int_equal(stx_srm(u1, NULL, 1, &x, &p, &det), 0);
    is_null(p, "srm k=1");
    assert_int_equal(det, 0);
    int64_t u0[] = {0, 0};
    assert_int_equal(stx_srm(u0, NULL, 2, &x, &p, &det), 0);
    is_null(x, "srm no users");
    assert_int_equal(det, 0);
    double wbad[] = {1, 0};
    assert_int_equal(stx_srm(u1, wbad, 2, &x, &p, &det), STX_EINVAL);
    is_null(p, "srm zero weight");
}

/* ---------------------------------------------------------------------- */
/* Logistic regression                                                      */
/* ---------------------------------------------------------------------- */

/* Generated in R (set.seed(20240501); variant <- sample(0:2, 80, TRUE);
 * events <- rpois(80, 6) + rbinom(80, 30, 0.1); conv <- rbinom(80, 1,
 * plogis(-2.2 + 0.7*(variant==1) - 0.4*(variant==2) + 0.55*log1p(events))))
 * and pasted here. Variant 0 is the control. */
static const int LG_VARIANT[] = {2, 2, 0, 1, 2, 1, 2, 1, 0, 0, 1, 2, 1, 2, 0, 0, 2, 1, 2, 2,
                                 1, 0, 2, 2, 2, 0, 1, 2, 2, 1, 1, 2, 0, 0, 1, 2, 0, 2, 1, 2,
                                 1, 0, 1, 2, 0, 2, 0, 0, 0, 2, 0, 1, 2, 1, 1, 1, 1, 1, 0, 1,
                                 0, 2, 2, 1, 0, 0, 0, 2, 0, 2, 1, 0, 0, 0, 0, 2, 2, 1, 2, 1};
static const int LG_EVENTS[] = {9, 8,  13, 11, 11, 9,  10, 7,  11, 4,  12, 6,  8,  7,  7,  15,
                                7, 12, 5,  9,  13, 10, 3,  6,  8,  11, 6,  12, 9,  10, 9,  11,
                                6, 10, 15, 9,  8,  18, 11, 4,  7,  9,  2,  11, 6,  9,  11, 6,
                                9, 14, 9,  6,  8,  10, 6,  15, 9,  12, 9,  9,  7,  14, 20, 13,
                                7, 12, 8,  7,  9,  7,  9,  10, 10, 12, 9,  8,  16, 12, 9,  11};
static const int LG_CONV[] = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0,
                              1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0,
                              1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1,
                              1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1};
#define LG_N 80
#define LG_P 4

static void design_row(int variant, int events, double *x)
{
    x[0] = 1.0;
    x[1] = variant == 1;
    x[2] = variant == 2;
    x[3] = log1p((double)events);
}

static void test_logit_vs_glm(void **state)
{
    (void)state;
    double X[LG_N * LG_P], y[LG_N];
    for (int i = 0; i < LG_N; i++) {
        design_row(LG_VARIANT[i], LG_EVENTS[i], X + i * LG_P);
        y[i] = LG_CONV[i];
    }
    stx_logit_t m;
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 50, &m), 0);
    /* R: d <- data.frame(conv, B = as.numeric(variant == 1), C =
     * as.numeric(variant == 2), le = log1p(events));
     * summary(glm(conv ~ B + C + le, family = binomial, data = d,
     *             control = glm.control(epsilon = 1e-14, maxit = 100)))
     * (a tighter epsilon than the default 1e-8 so that R's own stopping
     * point does not limit the comparison). */
    const double coef[] = {-4.6732216215825213, 1.0200683658218359, -0.83245419678966603,
                           1.6732060189616018};
    const double se[] = {2.1213155946682289, 0.60054575658096487, 0.66842813393109513,
                         0.89203000481452799};
    const double z[] = {-2.2029827307772218, 1.6985689344127628, -1.2453907227003098,
                        1.8757284059177997};
    const double p[] = {0.02759596583685657, 0.089400433920088548, 0.21298816181577027,
                        0.060692583278026464};
    for (int j = 0; j < LG_P; j++) {
        near_rel(m.coef[j], coef[j], 1e-9, "coef");
        near_rel(m.std_err[j], se[j], 1e-9, "std_err");
        near_rel(m.z[j], z[j], 1e-9, "z");
        near_rel(m.p_value[j], p[j], 1e-8, "p_value");
    }
    /* R: glm(...)$deviance = 89.065262298150699 */
    near_rel(m.deviance, 89.065262298150699, 1e-12, "deviance");
    assert_int_equal(m.n, LG_N);
    assert_int_equal(m.converged, 1);
    assert_true(m.iterations >= 3 && m.iterations <= 12);
}

/* Whether two design rows hold the same values. */
static int same_row(const double *a, const double *b)
{
    for (int j = 0; j < LG_P; j++)
        if (a[j] != b[j])
            return 0;
    return 1;
}

static void test_logit_grouped_equals_rows(void **state)
{
    (void)state;
    /* Group the same data by (variant, events) as the aggregator could. */
    double X[LG_N * LG_P], y[LG_N], GX[LG_N * LG_P];
    int64_t succ[LG_N], trials[LG_N];
    size_t g = 0;
    for (int i = 0; i < LG_N; i++) {
        design_row(LG_VARIANT[i], LG_EVENTS[i], X + i * LG_P);
        y[i] = LG_CONV[i];
        size_t k;
        for (k = 0; k < g; k++)
            if (same_row(GX + k * LG_P, X + i * LG_P))
                break;
        if (k == g) {
            memcpy(GX + g * LG_P, X + i * LG_P, sizeof(double) * LG_P);
            succ[g] = trials[g] = 0;
            g++;
        }
        succ[k] += LG_CONV[i];
        trials[k]++;
    }
    assert_true(g < LG_N);
    stx_logit_t a, b;
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 50, &a), 0);
    assert_int_equal(stx_logit_grouped(GX, succ, trials, g, LG_P, 50, &b), 0);
    for (int j = 0; j < LG_P; j++) {
        near_rel(b.coef[j], a.coef[j], 1e-10, "grouped coef");
        near_rel(b.std_err[j], a.std_err[j], 1e-10, "grouped se");
    }
    near_rel(b.deviance, a.deviance, 1e-12, "grouped deviance");
    assert_int_equal(b.n, LG_N);
}

static void test_logit_undefined(void **state)
{
    (void)state;
    double X[LG_N * LG_P], y[LG_N];
    for (int i = 0; i < LG_N; i++) {
        design_row(LG_VARIANT[i], LG_EVENTS[i], X + i * LG_P);
        y[i] = 0;
    }
    stx_logit_t m;

    /* One converter: fewer than 2 outcomes of a kind. */
    y[5] = 1;
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 50, &m), STX_EFEW);
    assert_int_equal(m.converged, 0);

    /* Quasi-complete separation: variant 2 never converts, so its
     * coefficient has no finite maximum (R's glm stops at a huge estimate
     * with "fitted probabilities numerically 0 or 1 occurred"). */
    for (int i = 0; i < LG_N; i++)
        y[i] = LG_VARIANT[i] == 2 ? 0 : LG_CONV[i];
    int rc = stx_logit(X, y, LG_N, LG_P, 50, &m);
    assert_int_equal(rc, STX_ESEPARATION);
    assert_int_equal(m.converged, 0);
    assert_true(m.coef[2] == 0.0 && m.std_err[2] == 0.0);

    /* Complete separation on engagement: converted exactly when events > 9. */
    for (int i = 0; i < LG_N; i++)
        y[i] = LG_EVENTS[i] > 9;
    rc = stx_logit(X, y, LG_N, LG_P, 50, &m);
    assert_int_equal(rc, STX_ESEPARATION);

    /* Collinear columns: the indicators of every variant plus the intercept. */
    double Xc[LG_N * 4], yc[LG_N];
    for (int i = 0; i < LG_N; i++) {
        Xc[i * 4 + 0] = 1.0;
        Xc[i * 4 + 1] = LG_VARIANT[i] == 0;
        Xc[i * 4 + 2] = LG_VARIANT[i] == 1;
        Xc[i * 4 + 3] = LG_VARIANT[i] == 2;
        yc[i] = LG_CONV[i];
    }
    assert_int_equal(stx_logit(Xc, yc, LG_N, 4, 50, &m), STX_ESINGULAR);

    /* One iteration is not enough to converge. */
    for (int i = 0; i < LG_N; i++)
        y[i] = LG_CONV[i];
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 1, &m), STX_ENOCONV);

    /* Bad arguments. */
    y[0] = 0.5;
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 50, &m), STX_EINVAL);
    y[0] = LG_CONV[0];
    assert_int_equal(stx_logit(X, y, 0, LG_P, 50, &m), STX_EINVAL);
    assert_int_equal(stx_logit(X, y, LG_N, STX_LOGIT_MAX_P + 1, 50, &m), STX_ETOOBIG);
    X[7] = NAN;
    assert_int_equal(stx_logit(X, y, LG_N, LG_P, 50, &m), STX_EINVAL);
    int64_t s1[] = {3}, t1[] = {2};
    double x1[] = {1.0};
    assert_int_equal(stx_logit_grouped(x1, s1, t1, 1, 1, 50, &m), STX_EINVAL);
    assert_string_equal(stx_strerror(STX_ESEPARATION), "separation: the coefficients diverge");
}

static void test_logit_large_with_tiny_variant(void **state)
{
    (void)state;
    /* A million control users and a variant with 3: the variant's direction
     * has almost no information, so the deviance settles long before its
     * coefficient does. This must converge, not be taken for separation.
     * R: d <- data.frame(s = c(15000, 18000, 21000, 24000, 27000, 1),
     *   t = c(rep(200000, 5), 3), B = c(0, 0, 0, 0, 0, 1), ev = c(0:4, 2));
     * summary(glm(cbind(s, t - s) ~ B + log1p(ev), family = binomial,
     *   data = d, control = glm.control(epsilon = 1e-14, maxit = 100))) */
    const int64_t s[] = {15000, 18000, 21000, 24000, 27000, 1};
    const int64_t t[] = {200000, 200000, 200000, 200000, 200000, 3};
    const double ev[] = {0, 1, 2, 3, 4, 2};
    double X[6 * 3];
    for (int i = 0; i < 6; i++) {
        X[i * 3 + 0] = 1.0;
        X[i * 3 + 1] = i == 5;
        X[i * 3 + 2] = log1p(ev[i]);
    }
    const double coef[] = {-2.5583993423912732, 1.4125993620606321, 0.41202233439375285};
    const double se[] = {0.0072839132159472275, 1.2247492612815492, 0.006153270037443077};
    stx_logit_t m;
    assert_int_equal(stx_logit_grouped(X, s, t, 6, 3, 50, &m), 0);
    for (int j = 0; j < 3; j++) {
        near_rel(m.coef[j], coef[j], 1e-8, "coef");
        near_rel(m.std_err[j], se[j], 1e-8, "std_err");
    }
    assert_int_equal(m.n, 1000003);
}

static void test_logit_intercept_only(void **state)
{
    (void)state;
    /* Analytic: with an intercept only, coef = logit(k/n) and
     * se = 1/sqrt(n p (1 - p)). 30 successes in 200 trials. */
    double x[] = {1.0};
    int64_t s[] = {30}, t[] = {200};
    stx_logit_t m;
    assert_int_equal(stx_logit_grouped(x, s, t, 1, 1, 0, &m), 0);
    near_rel(m.coef[0], log(0.15 / 0.85), 1e-13, "logit(0.15)");
    near_rel(m.std_err[0], 1.0 / sqrt(200 * 0.15 * 0.85), 1e-12, "se");
    assert_int_equal(m.n, 200);
}

/* ---------------------------------------------------------------------- */
/* The sequential interval                                                  */
/* ---------------------------------------------------------------------- */

static void test_seq_vs_formula(void **state)
{
    (void)state;
    /* The §6 formulas typed into R:
     * seqci <- function(xt, nt, xc, nc, alpha = 0.05, Nstar = 5000) {
     *   pt = xt/nt; pc = xc/nc; N = nt + nc;
     *   s2 = N*(pt*(1-pt)/nt + pc*(1-pc)/nc);
     *   r2 = (-2*log(alpha) + log(-2*log(alpha) + 1))/Nstar;
     *   hw = sqrt(s2*2*(N*r2+1)/(N^2*r2)*log(sqrt(N*r2+1)/alpha)); d = pt - pc;
     *   E = exp(r2*N^2*d^2/(2*s2*(N*r2+1)))/sqrt(N*r2+1);
     *   c(d - hw, d + hw, min(1, 1/E)) } */
    stx_suff_t t = props(1000, 120), c = props(1000, 100);
    /* seqci(120, 1000, 100, 1000) = -0.023688259076519287, 0.06368825907651926,
     * 0.93888560396514842 */
    stx_compare_t o = compare(&t, &c, 0.05, 5000);
    val_rel(o.seq_ci_low, -0.023688259076519287, 1e-12, "seq1 low");
    val_rel(o.seq_ci_high, 0.06368825907651926, 1e-12, "seq1 high");
    val_rel(o.seq_p_value, 0.93888560396514842, 1e-12, "seq1 p");
    /* seqci(1300, 10000, 1150, 10000) = 0.00050438389999569316,
     * 0.029495616100004306, 0.035745146014702953: significant */
    t = props(10000, 1300);
    c = props(10000, 1150);
    o = compare(&t, &c, 0.05, 5000);
    val_rel(o.seq_ci_low, 0.00050438389999569316, 1e-9, "seq2 low");
    val_rel(o.seq_ci_high, 0.029495616100004306, 1e-12, "seq2 high");
    val_rel(o.seq_p_value, 0.035745146014702953, 1e-11, "seq2 p");
    /* seqci(37, 400, 52, 610, alpha = 0.1, Nstar = 1000) =
     * -0.043536024010477313, 0.058044220731788797, 1 */
    t = props(400, 37);
    c = props(610, 52);
    o = compare(&t, &c, 0.10, 1000);
    val_rel(o.seq_ci_low, -0.043536024010477313, 1e-12, "seq3 low");
    val_rel(o.seq_ci_high, 0.058044220731788797, 1e-12, "seq3 high");
    val_rel(o.seq_p_value, 1.0, 0.0, "seq3 p");
}

static void test_seq_contains_fixed(void **state)
{
    (void)state;
    /* Always at least as wide as the fixed-horizon Wald interval, for any
     * N: docs/experiments.md shows why (−2 ln α ≥ z*² for every α). */
    const int64_t ns[] = {2,    5,    10,    37,    100,     500,      1000,
                          2500, 5000, 10000, 50000, 1000000, 10000000, 1000000000};
    const double rates[][2] = {{0.1, 0.12}, {0.5, 0.45}, {0.01, 0.011}, {0.9, 0.2}, {0.3, 0.0}};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        for (size_t r = 0; r < sizeof rates / sizeof rates[0]; r++) {
            int64_t nt = ns[i], nc = ns[i] + ns[i] / 3;
            stx_suff_t t = props(nt, (int64_t)(rates[r][0] * (double)nt));
            stx_suff_t c = props(nc, (int64_t)(rates[r][1] * (double)nc));
            stx_compare_t o = compare(&t, &c, 0.05, 5000);
            if (!o.diff_ci_low.ok) {
                is_null(o.seq_ci_low, "seq NULL with Wald");
                continue;
            }
            assert_true(o.seq_ci_low.ok && o.seq_ci_high.ok);
            assert_true(o.seq_ci_low.v <= o.diff_ci_low.v);
            assert_true(o.seq_ci_high.v >= o.diff_ci_high.v);
            /* Hence never significant when the fixed test is not. */
            if (o.diff_ci_low.v <= 0 && o.diff_ci_high.v >= 0)
                assert_true(o.seq_p_value.v >= 0.05);
        }
    }
}

static void test_seq_shrinks(void **state)
{
    (void)state;
    /* Fixed rates 12% vs 10%: the width falls strictly as N grows. */
    double prev = INFINITY;
    for (int64_t n = 50; n <= 50LL << 20; n *= 2) {
        stx_suff_t t = props(n, n * 12 / 100), c = props(n, n / 10);
        stx_compare_t o = compare(&t, &c, 0.05, 5000);
        double w = o.seq_ci_high.v - o.seq_ci_low.v;
        assert_true(w < prev);
        prev = w;
    }
    /* At N = 2^20 · 100 the interval is narrow enough to exclude 0. */
    assert_true(prev < 0.02);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void)
{
    return ut_xorshift(&rng_state);
}

static double unif(void)
{
    return (double)(rnd() >> 11) / 9007199254740992.0;
}

static void check_seq_consistent(const stx_compare_t *o, double alpha)
{
    assert_int_equal(o->seq_p_value.ok, o->seq_ci_low.ok);
    assert_int_equal(o->seq_p_value.ok, o->seq_ci_high.ok);
    if (!o->seq_p_value.ok)
        return;
    int excludes = o->seq_ci_low.v > 0 || o->seq_ci_high.v < 0;
    int significant = o->seq_p_value.v < alpha;
    if (excludes != significant) {
        print_error("alpha %.17g: ci (%.17g, %.17g) p %.17g\n", alpha, o->seq_ci_low.v,
                    o->seq_ci_high.v, o->seq_p_value.v);
        fail();
    }
    assert_true(o->seq_p_value.v >= 0 && o->seq_p_value.v <= 1);
    assert_true(o->seq_ci_low.v <= o->seq_ci_high.v);
}

static void test_seq_p_iff_excludes(void **state)
{
    (void)state;
    static const double alphas[] = {0.05, 0.01, 0.1, 0.001, 0.2, 1e-6};
    int significant = 0, not_significant = 0;
    for (int it = 0; it < 200000; it++) {
        double alpha = it % 7 == 6 ? 0.0001 + 0.5 * unif() : alphas[it % 6];
        double n_star = it % 3 == 0 ? 5000 : 10 + 1e6 * unif();
        int scale = (int)(rnd() % 7);
        int64_t nt = 1 + (int64_t)(rnd() % (uint64_t)(10 * (int64_t)pow(10, scale)));
        int64_t nc = 1 + (int64_t)(rnd() % (uint64_t)(10 * (int64_t)pow(10, scale)));
        double base = unif();
        int64_t xc = (int64_t)(base * (double)nc);
        int64_t xt = (int64_t)((base + 0.05 * (unif() - 0.5)) * (double)nt);
        if (xt < 0)
            xt = 0;
        if (xt > nt)
            xt = nt;
        switch (it % 11) { /* boundary rates */
        case 0:
            xc = 0;
            break;
        case 1:
            xt = nt;
            break;
        case 2:
            xc = nc;
            xt = 0;
            break;
        default:
            break;
        }
        stx_suff_t t = props(nt, xt), c = props(nc, xc);
        stx_compare_t o = compare(&t, &c, alpha, n_star);
        check_seq_consistent(&o, alpha);
        if (o.seq_p_value.ok && o.seq_p_value.v < alpha)
            significant++;
        else if (o.seq_p_value.ok)
            not_significant++;
    }
    /* The sweep must have exercised both sides. */
    assert_true(significant > 1000 && not_significant > 1000);

    /* Walk x_t across the boundary, one converter at a time for the smaller
     * sizes, where the two computations are closest. The p-value grows
     * monotonically with x_t here, so exactly one flip is expected (R: the
     * first significant x_t at n = 1000 is 146, seqci p 0.04816475). */
    const int64_t sizes[] = {1000, 9999, 100000, 3000000};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int64_t n = sizes[s];
        stx_suff_t c = props(n, n / 10);
        int flips = 0, prev = -1;
        for (int64_t xt = n / 10; xt <= n / 10 + n / 5 && xt <= n; xt += 1 + n / 100000) {
            stx_suff_t t = props(n, xt);
            stx_compare_t o = compare(&t, &c, 0.05, 5000);
            check_seq_consistent(&o, 0.05);
            int sig = o.seq_p_value.v < 0.05;
            if (prev >= 0 && sig != prev)
                flips++;
            prev = sig;
        }
        assert_int_equal(flips, 1);
    }
}

/*
 * Drive the tuning N* to the exact point where the interval's edge touches 0
 * (bisection down to adjacent doubles), where the p-value and the interval
 * are two roundings of the same boundary and most likely to disagree.
 */
static void test_seq_boundary_bisection(void **state)
{
    (void)state;
    static const double alphas[] = {0.05, 0.01, 0.1, 0.2, 0.003};
    static const int64_t sizes[] = {200, 1000, 5000, 20000, 100000, 1000000, 10000000};
    static const double zfix[] = {-4.5, 3.0, 3.5, 4.0, 5.0};
    int checked = 0;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        for (size_t zi = 0; zi < sizeof zfix / sizeof zfix[0]; zi++) {
            /* Control at 10%, treatment at a fixed-horizon z of about zfix. */
            int64_t n = sizes[k];
            double pt_ = 0.1 + zfix[zi] * sqrt(0.18 / (double)n);
            int64_t xt = pt_ < 0 ? 0 : (int64_t)(pt_ * (double)n);
            stx_suff_t t = props(n, xt), c = props(n + 7, (n + 7) / 10);
            for (size_t a = 0; a < sizeof alphas / sizeof alphas[0]; a++) {
                double alpha = alphas[a];
                /* Find a significant and a not significant N* by a coarse scan. It is
                 * geometric: rounding moves its points, never whether it ends. */
                double yes = -1, no = -1;
                // NOLINTNEXTLINE(clang-analyzer-security.FloatLoopCounter)
                for (double ns = 1e-3; ns < 1e12; ns *= 1.5) {
                    stx_compare_t o = compare(&t, &c, alpha, ns);
                    check_seq_consistent(&o, alpha);
                    int ex = o.seq_ci_low.v > 0 || o.seq_ci_high.v < 0;
                    if (ex && yes < 0)
                        yes = ns;
                    if (!ex && no < 0)
                        no = ns;
                }
                if (yes < 0 || no < 0)
                    continue;
                for (int i = 0; i < 2000; i++) {
                    double mid = 0.5 * (yes + no);
                    if (mid == yes || mid == no)
                        break;
                    stx_compare_t o = compare(&t, &c, alpha, mid);
                    check_seq_consistent(&o, alpha);
                    if (o.seq_ci_low.v > 0 || o.seq_ci_high.v < 0)
                        yes = mid;
                    else
                        no = mid;
                }
                /* The two neighbours of the boundary and a few ulps around. */
                double probe[2] = {yes, no};
                for (int j = 0; j < 2; j++) {
                    double ns = probe[j];
                    for (int u = 0; u < 8; u++)
                        ns = nextafter(ns, 0.0);
                    for (int u = 0; u < 16; u++) {
                        stx_compare_t o = compare(&t, &c, alpha, ns);
                        check_seq_consistent(&o, alpha);
                        ns = nextafter(ns, INFINITY);
                        checked++;
                    }
                }
            }
        }
    }
    print_message("boundary probes: %d\n", checked);
    assert_true(checked >= 500);
}

/* ---------------------------------------------------------------------- */
/* NULL cases                                                               */
/* ---------------------------------------------------------------------- */

static void test_null_cases(void **state)
{
    (void)state;
    stx_compare_t o;

    /* Empty variant: everything NULL. */
    stx_suff_t empty = props(0, 0), c = props(100, 10);
    o = compare(&empty, &c, 0.05, 5000);
    const stx_val_t *f = &o.abs_lift;
    for (size_t i = 0; i < sizeof o / sizeof *f; i++)
        is_null(f[i], "empty treatment");
    o = compare(&c, &empty, 0.05, 5000);
    for (size_t i = 0; i < sizeof o / sizeof *f; i++)
        is_null(f[i], "empty control");

    /* p_c = 0: no relative lift; the rest is defined. */
    stx_suff_t t = props(100, 5), c0 = props(100, 0);
    o = compare(&t, &c0, 0.05, 5000);
    is_null(o.rel_lift, "rel_lift p_c=0");
    is_null(o.rel_ci_low, "rel_ci_low p_c=0");
    is_null(o.rel_ci_high, "rel_ci_high p_c=0");
    val_rel(o.abs_lift, 0.05, 1e-15, "abs_lift p_c=0");
    assert_true(o.z.ok && o.p_value.ok && o.seq_p_value.ok && o.chance_to_win.ok);

    /* Zero variance: nobody converts anywhere. */
    stx_suff_t z1 = props(100, 0), z2 = props(80, 0);
    o = compare(&z1, &z2, 0.05, 5000);
    val_rel(o.abs_lift, 0.0, 0.0, "abs_lift zero var");
    is_null(o.z, "z zero var");
    is_null(o.p_value, "p zero var");
    is_null(o.diff_ci_low, "diff_ci zero var");
    is_null(o.diff_ci_high, "diff_ci zero var");
    is_null(o.seq_ci_low, "seq zero var");
    is_null(o.seq_ci_high, "seq zero var");
    is_null(o.seq_p_value, "seq_p zero var");
    is_null(o.chance_to_win, "ctw zero var");
    is_null(o.rel_lift, "rel zero var");
    /* No revenue at all: rpu_diff is 0, its test undefined. */
    val_rel(o.rpu_diff, 0.0, 0.0, "rpu_diff no revenue");
    is_null(o.rpu_p_value, "rpu_p no revenue");

    /* Everybody converts in both: pooled variance 0, relative lift 0 with a
     * zero delta-method variance. */
    stx_suff_t a1 = props(50, 50), a2 = props(70, 70);
    o = compare(&a1, &a2, 0.05, 5000);
    val_rel(o.rel_lift, 0.0, 0.0, "rel all convert");
    is_null(o.rel_ci_low, "rel_ci all convert");
    is_null(o.z, "z all convert");

    /* Opposite extremes: the pooled test is defined, the unpooled variance
     * is 0, so the Wald and sequential intervals are NULL. */
    stx_suff_t all = props(50, 50), none = props(50, 0);
    o = compare(&all, &none, 0.05, 5000);
    assert_true(o.z.ok && o.p_value.ok);
    is_null(o.diff_ci_low, "diff_ci extremes");
    is_null(o.seq_p_value, "seq extremes");

    /* One user per arm: a difference of means, no Welch test. */
    stx_suff_t u1 = {
        .users = 1, .converters = 1, .orders = 1, .revenue_cents = 500, .revenue_sq = 25.0};
    stx_suff_t u2 = {
        .users = 1, .converters = 1, .orders = 1, .revenue_cents = 200, .revenue_sq = 4.0};
    o = compare(&u1, &u2, 0.05, 5000);
    val_rel(o.rpu_diff, 3.0, 1e-15, "rpu_diff n=1");
    is_null(o.rpu_p_value, "rpu_p n=1");
    is_null(o.rpu_df, "rpu_df n=1");

    /* Invalid parameters: EINVAL, all NULL. */
    stx_suff_t t2 = props(100, 12);
    assert_int_equal(stx_compare(&t2, &c, 0.0, 5000, &o), STX_EINVAL);
    is_null(o.abs_lift, "alpha 0");
    assert_int_equal(stx_compare(&t2, &c, 1.0, 5000, &o), STX_EINVAL);
    assert_int_equal(stx_compare(&t2, &c, 0.05, 0.0, &o), STX_EINVAL);
    assert_int_equal(stx_compare(&t2, &c, NAN, 5000, &o), STX_EINVAL);
    stx_suff_t bad = props(10, 11);
    assert_int_equal(stx_compare(&bad, &c, 0.05, 5000, &o), STX_EINVAL);
    is_null(o.z, "bad suff");
}

static void test_random_no_nan(void **state)
{
    (void)state;
    /* Whatever the sufficient statistics, nothing non-finite comes out. */
    for (int it = 0; it < 20000; it++) {
        stx_suff_t s[2];
        for (int k = 0; k < 2; k++) {
            memset(&s[k], 0, sizeof s[k]);
            s[k].users = (int64_t)(rnd() % 5);
            if (it % 5 == 0)
                s[k].users = (int64_t)(rnd() % 2000000000);
            s[k].converters = s[k].users ? (int64_t)(rnd() % (uint64_t)(s[k].users + 1)) : 0;
            s[k].revenue_cents = it % 3 ? (int64_t)(rnd() % 100000) * s[k].converters : 0;
            double m = (double)s[k].revenue_cents / 100.0;
            s[k].revenue_sq = it % 4 ? m * m * unif() : m * m;
            s[k].carts = s[k].converters;
        }
        stx_compare_t o;
        int rc = stx_compare(&s[0], &s[1], 0.05, 5000, &o);
        assert_int_equal(rc, 0);
        sane_compare(&o);
        stx_variant_t v;
        assert_int_equal(stx_variant_summary(&s[0], &v), 0);
        const stx_val_t *f = &v.conversion_rate;
        for (size_t i = 0; i < sizeof v / sizeof *f; i++)
            sane(f[i], "summary");
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pnorm_qnorm),
        cmocka_unit_test(test_pt_qt),
        cmocka_unit_test(test_pchisq),
        cmocka_unit_test(test_wrapper_domain),
        cmocka_unit_test(test_two_proportions_vs_prop_test),
        cmocka_unit_test(test_two_proportions_extreme_tail),
        cmocka_unit_test(test_welch_vs_t_test),
        cmocka_unit_test(test_variant_summary),
        cmocka_unit_test(test_zero_variance_double_path),
        cmocka_unit_test(test_exact_variance),
        cmocka_unit_test(test_suff_apply_order_independent),
        cmocka_unit_test(test_chi2_independence),
        cmocka_unit_test(test_srm),
        cmocka_unit_test(test_logit_vs_glm),
        cmocka_unit_test(test_logit_grouped_equals_rows),
        cmocka_unit_test(test_logit_undefined),
        cmocka_unit_test(test_logit_large_with_tiny_variant),
        cmocka_unit_test(test_logit_intercept_only),
        cmocka_unit_test(test_seq_vs_formula),
        cmocka_unit_test(test_seq_contains_fixed),
        cmocka_unit_test(test_seq_shrinks),
        cmocka_unit_test(test_seq_p_iff_excludes),
        cmocka_unit_test(test_seq_boundary_bisection),
        cmocka_unit_test(test_null_cases),
        cmocka_unit_test(test_random_no_nan),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
