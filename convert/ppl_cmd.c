/* convert/ppl_cmd.c: `mixbit ppl`: perplexity and KL divergence of a model on a text file. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../calib/calib.h"
#include "convert.h"

int mb_ppl_cmd(const struct mb_ppl_cmd_params *p) {
    struct mb_ppl_params pp;
    mb_ppl_default_params(&pp);
    if (!p->convention || !strcmp(p->convention, "paper")) pp.convention = MB_PPL_PAPER;
    else if (!strcmp(p->convention, "llamacpp")) pp.convention = MB_PPL_LLAMACPP;
    else return mb_fail(MB_EUSAGE, "--convention must be paper or llamacpp, not \"%s\"", p->convention);
    if (p->bos && strcmp(p->bos, "yes") && strcmp(p->bos, "no") && strcmp(p->bos, "auto"))
        return mb_fail(MB_EUSAGE, "--bos must be yes, no or auto, not \"%s\"", p->bos);
    pp.stride = p->stride;
    if (p->stride && pp.convention != MB_PPL_PAPER) return mb_fail(MB_EUSAGE, "--stride applies to the paper convention");
    pp.max_tokens = p->max_tokens;
    if (p->batch_tokens > 0) pp.batch_tokens = p->batch_tokens;
    if (p->topk) pp.topk = (int)p->topk;
    pp.save_logprobs = p->save_logprobs;
    pp.kld = p->kld;
    if (p->kld && p->save_logprobs) {
        struct stat a, b;
        if (!strcmp(p->kld, p->save_logprobs) || (!stat(p->kld, &a) && !stat(p->save_logprobs, &b) && a.st_dev == b.st_dev && a.st_ino == b.st_ino))
            return mb_fail(MB_EUSAGE, "--kld and --save-logprobs name the same file (%s): the reference would be overwritten", p->kld);
    }
    int rc0 = mb_ops_select(p->device, &pp.ops);
    if (rc0) return rc0;
    if ((rc0 = mb_check_regular(p->text))) return rc0; /* a FIFO or a device would block or never end */
    struct mb_model *m = NULL;
    struct mb_tokenizer *t = NULL;
    int rc = mb_model_open(p->model, &m);
    if (!rc) rc = mb_tokenizer_load(m->dir, &t);
    const char *bos_src = "the model's tokenizer";
    if (!rc) {
        /* default context: the convention's, but never beyond the model's positions */
        int64_t def = pp.convention == MB_PPL_LLAMACPP ? 512 : 2048;
        pp.ctx = p->ctx > 0 ? p->ctx : (def < m->cfg.max_pos ? def : m->cfg.max_pos);
        if (p->stride > pp.ctx) rc = mb_fail(MB_EUSAGE, "--stride must be in 1..ctx (%lld)", (long long)pp.ctx);
        if (pp.ctx > m->cfg.max_pos)
            mb_warn("context %lld exceeds the model's max_position_embeddings %lld", (long long)pp.ctx, (long long)m->cfg.max_pos);
        pp.bos = mb_tokenizer_adds_bos(t);
        if (p->bos && strcmp(p->bos, "auto")) { pp.bos = !strcmp(p->bos, "yes"); bos_src = "--bos"; }
        pp.bos_id = mb_tokenizer_bos(t);
        if (pp.bos && pp.bos_id < 0) rc = mb_fail(MB_EINVAL, "%s: the tokenizer has no BOS token (use --bos no)", m->dir);
    }
    struct mb_ppl_result r;
    if (!rc) {
        mb_info("%s: convention %s, ctx %lld, BOS %s (%s), text streamed, compute: %s", p->text, pp.convention == MB_PPL_PAPER ? "paper" : "llamacpp",
                (long long)pp.ctx, pp.bos ? "yes" : "no", bos_src, pp.ops->name);
        rc = mb_ppl_run_file(m, t, p->text, &pp, &r);
    }
    if (!rc) {
        const char *conv = pp.convention == MB_PPL_PAPER ? "paper" : "llamacpp";
        if (p->json) {
            printf("{\"ppl\": %.6f, \"tokens\": %lld, \"mean_nll\": %.8f, \"convention\": \"%s\", \"ctx\": %lld, \"bos\": %s, \"evaluated\": %lld, \"tok_per_s\": %.1f",
                   r.ppl, (long long)r.tokens, r.mean_nll, conv, (long long)pp.ctx, pp.bos ? "true" : "false", (long long)r.evaluated, r.tok_per_s);
            if (r.has_kld) printf(", \"kld_mean\": %.8f, \"kld_p99\": %.8f, \"same_top1\": %.4f", r.kld_mean, r.kld_p99, r.same_top1);
            printf("}\n");
        } else {
            printf("perplexity %.4f over %lld tokens (convention %s, ctx %lld%s, BOS %s)\n", r.ppl, (long long)r.tokens, conv, (long long)pp.ctx,
                   pp.stride ? ", strided" : "", pp.bos ? "yes" : "no");
            printf("mean nll %.6f; %lld tokens evaluated in %.2f s (%.0f tok/s)\n", r.mean_nll, (long long)r.evaluated, r.seconds, r.tok_per_s);
            if (r.has_kld) printf("KL divergence vs %s: mean %.6f, p99 %.6f, same top-1 %.2f%%\n", p->kld, r.kld_mean, r.kld_p99, r.same_top1);
            if (p->save_logprobs) printf("saved top-%d log-probabilities to %s\n", pp.topk, p->save_logprobs);
        }
    }
    mb_tokenizer_free(t);
    mb_model_close(m);
    return rc;
}
