/* tests/test_measurement.c: the measurement.json reader. A valid file in the reference converter's layout
 * (tables round-trip to the same setting strings, null modules skipped), then one bad value at a time:
 * each must be refused with one line naming the file, the module and the option index. */
#include <jansson.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../quant/quant.h"
#include "harness.h"

static char tmpdir[256];

/* {"group_size": {...}, "bits": [...], "bits_prop": [...], "scale_bits": 4} of a setting string */
static json_t *proj_json(const char *setting) {
    struct mb_qsetting q;
    if (mb_qsetting_parse(setting, &q)) return NULL;
    json_t *o = json_object(), *gs = json_object(), *b = json_array(), *bp = json_array();
    for (int i = 0; i < q.n; i++) {
        char k[8];
        snprintf(k, sizeof k, "%d", q.bits[i]);
        json_object_set_new(gs, k, json_integer(q.gsize[i]));
        json_array_append_new(b, json_integer(q.bits[i]));
        json_array_append_new(bp, json_real(q.prop[i]));
    }
    json_object_set_new(o, "group_size", gs);
    json_object_set_new(o, "bits", b);
    json_object_set_new(o, "bits_prop", bp);
    json_object_set_new(o, "scale_bits", json_integer(4));
    return o;
}

/* a measurement of one attention and one MLP module with every option row of the reference tables, plus
 * the null entries the reference writes for the modules it does not measure */
static json_t *base_measurement(void) {
    static const char *ak[4] = {"q_proj", "k_proj", "v_proj", "o_proj"}, *mk[3] = {"gate_proj", "up_proj", "down_proj"};
    json_t *root = json_object(), *meas = json_object(), *attn = json_array(), *mlp = json_array();
    for (int r = 0; r < MB_ATTN_OPTIONS; r++) {
        json_t *o = json_object();
        json_object_set_new(o, "accuracy", json_real(0.5 + 0.02 * r));
        json_object_set_new(o, "total_bits", json_integer(100000 + 1000 * r));
        for (int p = 0; p < 4; p++) json_object_set_new(o, ak[p], proj_json(mb_attn_table[r][p]));
        json_array_append_new(attn, o);
    }
    for (int r = 0; r < MB_MLP_OPTIONS; r++) {
        json_t *o = json_object();
        json_object_set_new(o, "accuracy", json_real(0.6 + 0.02 * r));
        json_object_set_new(o, "total_bits", json_integer(300000 + 1000 * r));
        for (int p = 0; p < 3; p++) json_object_set_new(o, mk[p], proj_json(mb_mlp_table[r][p]));
        json_array_append_new(mlp, o);
    }
    json_object_set_new(meas, "model.layers.0.self_attn", attn);
    json_object_set_new(meas, "model.layers.0.mlp", mlp);
    json_object_set_new(meas, "model.norm.norm", json_null());
    json_object_set_new(meas, "lm_head.linear", json_null());
    json_object_set_new(root, "measurement", meas);
    json_object_set_new(root, "last_module_idx", json_integer(4));
    return root;
}

/* set (or with val NULL delete) the value at a '/'-separated path; numeric parts index lists */
static int set_path(json_t *root, const char *path, const char *val) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *cur = root;
    char *save = NULL, *part = strtok_r(buf, "/", &save);
    while (part) {
        char *next = strtok_r(NULL, "/", &save);
        int is_idx = part[0] >= '0' && part[0] <= '9';
        if (!next) {
            json_t *v = NULL;
            if (val) {
                json_error_t je;
                if (!(v = json_loads(val, JSON_DECODE_ANY, &je))) { fprintf(stderr, "bad value %s\n", val); return -1; }
            }
            if (is_idx) return v ? json_array_set_new(cur, (size_t)atoi(part), v) : json_array_remove(cur, (size_t)atoi(part));
            return v ? json_object_set_new(cur, part, v) : json_object_del(cur, part);
        }
        cur = is_idx ? json_array_get(cur, (size_t)atoi(part)) : json_object_get(cur, part);
        if (!cur) { fprintf(stderr, "no path %s\n", path); return -1; }
        part = next;
    }
    return -1;
}

static int parse_json(json_t *root, struct mb_measurement **m) {
    char *text = json_dumps(root, JSON_INDENT(1));
    int rc = mb_measurement_parse("meas-file.json", text, strlen(text), m);
    free(text);
    return rc;
}

static void test_valid(void) {
    json_t *root = base_measurement();
    struct mb_measurement *m = NULL;
    CHECK_MSG(parse_json(root, &m) == 0, "%s", mb_errmsg());
    json_decref(root);
    if (!m) return;
    CHECK_EQ(m->n_modules, 2); /* the null modules are skipped */
    CHECK_EQ(m->last_module_idx, 4);
    const struct mb_meas_module *a = mb_measurement_find(m, "model.layers.0.self_attn"), *b = mb_measurement_find(m, "model.layers.0.mlp");
    CHECK(a && b);
    CHECK(mb_measurement_find(m, "model.norm.norm") == NULL);
    CHECK(mb_measurement_find(m, "model.layers.1.mlp") == NULL);
    if (!a || !b) { mb_measurement_free(m); return; }
    CHECK_EQ(a->n_opts, MB_ATTN_OPTIONS);
    CHECK_EQ(b->n_opts, MB_MLP_OPTIONS);
    /* option order is the file's; settings read back exactly as the tables write them */
    int bad = 0;
    for (int r = 0; r < MB_ATTN_OPTIONS; r++) {
        CHECK_NEAR(a->opts[r].accuracy, 0.5 + 0.02 * r, 1e-12);
        CHECK_EQ(a->opts[r].total_bits, 100000 + 1000 * r);
        CHECK_EQ(a->opts[r].n_proj, 4);
        static const char *ak[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
        for (int p = 0; p < 4; p++) {
            const char *s = mb_meas_option_setting(&a->opts[r], ak[p]);
            if (!s || strcmp(s, mb_attn_table[r][p])) { bad++; fprintf(stderr, "attn row %d %s: %s vs %s\n", r, ak[p], s ? s : "(none)", mb_attn_table[r][p]); }
        }
    }
    for (int r = 0; r < MB_MLP_OPTIONS; r++) {
        static const char *mk[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            const char *s = mb_meas_option_setting(&b->opts[r], mk[p]);
            if (!s || strcmp(s, mb_mlp_table[r][p])) { bad++; fprintf(stderr, "mlp row %d %s: %s vs %s\n", r, mk[p], s ? s : "(none)", mb_mlp_table[r][p]); }
        }
    }
    CHECK_EQ(bad, 0);
    CHECK(mb_meas_option_setting(&a->opts[0], "w1") == NULL);
    mb_measurement_free(m);
    mb_measurement_free(NULL);

    /* other spellings the reference converter's QParams accepts: group_size as one integer or a list; an
     * MLP without gate; MoE modules; accuracy exactly 0 and 1 */
    const char *alt = "{\"measurement\": {\"model.layers.3.mlp\": [{\"accuracy\": 1, \"total_bits\": 7,"
                      " \"up_proj\": {\"group_size\": 64, \"bits\": [3, 2], \"bits_prop\": [0.1, 0.9], \"scale_bits\": 4},"
                      " \"down_proj\": {\"group_size\": [32, 128], \"bits\": [8, 4], \"bits_prop\": [0.05, 0.95], \"scale_bits\": 4}}],"
                      " \"model.layers.3.block_sparse_moe\": [{\"accuracy\": 0, \"total_bits\": 9,"
                      " \"w1\": {\"group_size\": {\"4\": 32}, \"bits\": [4], \"bits_prop\": [1], \"scale_bits\": 4},"
                      " \"w3\": {\"group_size\": {\"4\": 32}, \"bits\": [4], \"bits_prop\": [1], \"scale_bits\": 4},"
                      " \"w2\": {\"group_size\": {\"4\": 32}, \"bits\": [4], \"bits_prop\": [1], \"scale_bits\": 4}}]}}";
    CHECK_MSG(mb_measurement_parse("alt.json", alt, strlen(alt), &m) == 0, "%s", mb_errmsg());
    if (m) {
        const struct mb_meas_module *x = mb_measurement_find(m, "model.layers.3.mlp");
        CHECK(x && x->opts[0].n_proj == 2);
        if (x) CHECK_STR(mb_meas_option_setting(&x->opts[0], "down_proj"), "0.05:8b_32g/0.95:4b_128g");
        if (x) CHECK_STR(mb_meas_option_setting(&x->opts[0], "up_proj"), "0.1:3b_64g/0.9:2b_64g");
        CHECK_EQ(m->last_module_idx, -1);
    }
    mb_measurement_free(m);
}

static void test_invalid(void) {
    static const struct { const char *path, *val, *want; } cases[] = {
        /* accuracy */
        {"measurement/model.layers.0.self_attn/3/accuracy", "1.5", "model.layers.0.self_attn option 3"},
        {"measurement/model.layers.0.self_attn/3/accuracy", "-0.1", "option 3: \"accuracy\""},
        {"measurement/model.layers.0.self_attn/3/accuracy", "\"0.9\"", "option 3: \"accuracy\""},
        {"measurement/model.layers.0.self_attn/3/accuracy", NULL, "option 3: no \"accuracy\""},
        {"measurement/model.layers.0.mlp/16/accuracy", "1.0000001", "model.layers.0.mlp option 16"},
        /* total_bits */
        {"measurement/model.layers.0.self_attn/0/total_bits", "0", "option 0: \"total_bits\""},
        {"measurement/model.layers.0.self_attn/0/total_bits", "-5", "option 0: \"total_bits\""},
        {"measurement/model.layers.0.self_attn/0/total_bits", "1.5", "option 0: \"total_bits\""},
        {"measurement/model.layers.0.self_attn/0/total_bits", "\"100\"", "option 0: \"total_bits\""},
        {"measurement/model.layers.0.self_attn/0/total_bits", NULL, "option 0: no \"total_bits\""},
        {"measurement/model.layers.0.self_attn/0/total_bits", "9223372036854775807", "option 0: \"total_bits\""},
        /* settings */
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "[7, 2]", "option 2: q_proj: \"bits\"[0]"},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "[2, 3]", "option 2: q_proj: \"bits\" must be in descending order"},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "[]", "option 2: q_proj: \"bits\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "[4, 3, 3, 2, 2]", "option 2: q_proj: \"bits\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "\"3,2\"", "option 2: q_proj: \"bits\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits_prop", "[0.5, 0.6]", "sums to"},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits_prop", "[0, 1]", "\"bits_prop\"[0]"},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits_prop", "[0.1]", "option 2: q_proj: \"bits_prop\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits_prop", "[\"a\", 0.9]", "\"bits_prop\"[0]"},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "{\"3\": 64}", "no entry for 2 bits"},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "{\"3\": 64, \"2\": 16}", "group size for 2 bits"},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "{\"3\": 64, \"2\": 64, \"5\": 32}", "\"group_size\" has an entry \"5\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "\"64\"", "option 2: q_proj: \"group_size\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "0", "group size"},
        {"measurement/model.layers.0.self_attn/2/q_proj/group_size", "[64]", "\"group_size\" has 1 entries for 2 parts"},
        {"measurement/model.layers.0.self_attn/2/q_proj/scale_bits", "3", "\"scale_bits\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/scale_bits", NULL, "\"scale_bits\""},
        {"measurement/model.layers.0.self_attn/2/q_proj/desc", "\"x\"", "unknown key \"desc\""},
        {"measurement/model.layers.0.self_attn/2/q_proj", "\"0.1:4b_128g\"", "option 2: q_proj: is a string"},
        /* projections and module kinds */
        {"measurement/model.layers.0.self_attn/5/foo", "1", "option 5: unknown key \"foo\""},
        {"measurement/model.layers.0.self_attn/0/gate_proj", "{}", "option 0: has 5 projections"},
        {"measurement/model.layers.0.self_attn/2/q_proj/bits", "[7]", "option 2: q_proj: \"bits_prop\""},
        {"measurement/model.layers.0.self_attn/0/o_proj", NULL, "option 0: projections do not match"},
        {"measurement/model.layers.0.self_attn/4/o_proj", NULL, "option 4: has other projections than option 0"},
        {"measurement/model.layers.0.mlp/0/w1", "{\"group_size\": 32, \"bits\": [4], \"bits_prop\": [1], \"scale_bits\": 4}", "option 0: projections do not match"},
        {"measurement/model.layers.0.self_attn/0", "[1]", "option 0: is a list"},
        {"measurement/model.layers.0.self_attn/0", "{\"accuracy\": 0.5, \"total_bits\": 4}", "option 0: projections do not match"},
        /* module entries */
        {"measurement/model.layers.0.self_attn", "[]", "has 0 options"},
        {"measurement/model.layers.0.self_attn", "{\"attn\": []}", "expected a list of options"},
        {"measurement/model.layers.0.self_attn", "\"x\"", "expected a list of options"},
        {"measurement/model.layers.0.unknown", "[]", "model.layers.0.unknown: not a module"},
        /* top level */
        {"measurement", "[]", "\"measurement\" is a list"},
        {"measurement", NULL, "\"measurement\" is missing"},
        {"last_module_idx", "-1", "\"last_module_idx\""},
        {"last_module_idx", "\"3\"", "\"last_module_idx\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        json_t *root = base_measurement();
        CHECK_EQ(set_path(root, cases[i].path, cases[i].val), 0);
        struct mb_measurement *m = (struct mb_measurement *)1;
        int rc = parse_json(root, &m);
        json_decref(root);
        CHECK_MSG(rc == MB_EFORMAT, "case %zu (%s = %s): rc %d", i, cases[i].path, cases[i].val ? cases[i].val : "(removed)", rc);
        CHECK(m == NULL);
        CHECK_MSG(strstr(mb_errmsg(), "meas-file.json") && strstr(mb_errmsg(), cases[i].want), "case %zu (%s = %s): %s", i, cases[i].path,
                  cases[i].val ? cases[i].val : "(removed)", mb_errmsg());
        CHECK_MSG(!strchr(mb_errmsg(), '\n'), "case %zu: not one line", i);
    }
    /* not JSON, duplicate keys, a real that overflows, not an object */
    const char *texts[] = {"", "{", "[1, 2]", "{\"measurement\": {}, \"measurement\": {}}",
                           "{\"measurement\": {\"model.layers.0.mlp\": [{\"accuracy\": 1e999, \"total_bits\": 1}]}}"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        struct mb_measurement *m = NULL;
        CHECK_MSG(mb_measurement_parse("meas-file.json", texts[i], strlen(texts[i]), &m) == MB_EFORMAT, "text %zu", i);
        CHECK_MSG(strstr(mb_errmsg(), "meas-file.json"), "%s", mb_errmsg());
    }
}

/* the file reader: regular files only, never blocking on a FIFO; an option without any projection (the
 * first finding of the fuzz target) */
static void test_load(void) {
    char p[512];
    json_t *root = base_measurement();
    snprintf(p, sizeof p, "%s/measurement.json", tmpdir);
    CHECK_EQ(json_dump_file(root, p, 0), 0);
    json_decref(root);
    struct mb_measurement *m = NULL;
    CHECK_MSG(mb_measurement_load(p, &m) == 0, "%s", mb_errmsg());
    if (m) CHECK_EQ(m->n_modules, 2);
    mb_measurement_free(m);
    m = NULL;
    snprintf(p, sizeof p, "%s/fifo.json", tmpdir);
    CHECK_EQ(mkfifo(p, 0600), 0);
    alarm(20);
    CHECK_EQ(mb_measurement_load(p, &m), MB_EIO);
    alarm(0);
    CHECK_MSG(strstr(mb_errmsg(), p) && strstr(mb_errmsg(), "FIFO"), "%s", mb_errmsg());
    snprintf(p, sizeof p, "%s/none.json", tmpdir);
    CHECK_EQ(mb_measurement_load(p, &m), MB_EIO);
    const char *noproj = "{\"measurement\": {\"moders.0.self_attn\": [{\"accuracy\": 0.91, \"total_bits\": 4}]}}";
    CHECK_EQ(mb_measurement_parse("f.json", noproj, strlen(noproj), &m), MB_EFORMAT);
    const char *noproj2 = "{\"measurement\": {\"model.layers.0.mlp\": [{\"accuracy\": 0.91, \"total_bits\": 4}]}}";
    CHECK_EQ(mb_measurement_parse("f.json", noproj2, strlen(noproj2), &m), MB_EFORMAT);
    CHECK_MSG(strstr(mb_errmsg(), "option 0: projections do not match"), "%s", mb_errmsg());
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "test_measurement: blocked on a FIFO\n";
    if (write(2, msg, sizeof msg - 1)) {}
    _exit(3);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/mb_test_measurement_XXXXXX");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 1; }
    RUN(test_valid);
    RUN(test_invalid);
    RUN(test_load);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd)) {}
    TEST_MAIN_END();
}
