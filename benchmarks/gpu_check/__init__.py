"""One command that proves and measures fastenc on a GPU, and leaves its evidence in one folder.

    python -m benchmarks.gpu_check --out DIR [--budget SECONDS] [--only STAGE,...] [--dry-run] [--data DIR]
    python -m benchmarks.gpu_check --bundle DIR

From the tree's root, with nothing installed: it puts the tree, and the bundle's ``site`` folder, on
``sys.path`` and ``PYTHONPATH`` itself; no pip. Stages, in order, each in its own process group with its
share of the budget (a hang, a crash or a sticky CUDA fault ends that stage, not the check; a stage that
fails or runs out of time still leaves what it wrote, and the run moves on):

1. ``env`` (``stage_env``): GPU, SM count, driver, versions, commit; the fp16 and bf16 matmul peaks (8192³)
   and the device copy bandwidth (1 GiB, read + write counted), with ``fastenc.bench``'s timing. Every
   later ratio is taken against these.
2. ``compile`` (``stage_compile``): the first call of every kernel at the shapes and dtypes the later
   stages use, in parallel groups with a Triton cache each (compiles counted and timed per group and
   kernel), merged into the cache the later stages share; each GEMM's tiles at 128 tokens.
3. ``correctness`` (``stage_correctness``): the GPU's subset of the tests (marked ``cuda`` or ``gpu``: every
   kernel variant in fp16/bf16, the whole model for one family per kind of attention) through pytest in
   parallel workers, with a JUnit report.
4. ``sanitizer`` (``stage_sanitizer``): compute-sanitizer's memcheck on ragged forwards of BERT at head
   dims 64, 40 and 32, a ModernBERT, an MPNet and the SPLADE kernel; racecheck on the attention variants
   and the SPLADE kernel, each hazard recorded with its kernel and told real or benign.
5. ``bench`` (``stage_bench``): ``fastenc bench --plan gpu-check`` within the stage's time.
6. ``embed`` (``stage_embed``): ``embed()`` on 5,000 real texts with all-MiniLM-L6-v2 in fp16 against
   sentence-transformers and against ``forward_packed`` alone; the cold start in a fresh process.
7. ``report`` (``summary``): ``summary.md``, ``results.json``, ``results.md``, ``results.png``, ``check.log`` and
   ``junit.xml``, flat in DIR, rewritten after every stage: a check stopped at any moment leaves them.

``plan`` shares out the budget (480 s by default): each stage starts with its share of what is left, the
planned limits add up to the budget. ``--only bench`` reruns one stage after a fix (the report keeps the
other stages of an earlier ``results.json`` in DIR).

``--bundle DIR`` (``bundle``; on a machine with the bundled all-MiniLM-L6-v2 installed) writes what the GPU
machine lacks into DIR and prints the command that runs the check there. ``/.gpu/`` is in ``.gitignore``.

``--dry-run`` rehearses every stage on the CPU at small shapes (fastenc's torch backend and the Triton
interpreter, sentence-transformers on the CPU, the sanitizer's targets without the sanitizer), writes the
same files with the same schema, and plans the GPU run: every stage's kernel launches at the GPU's shapes
are recorded without running them (``launches``), which gives the Triton compiles each stage will cost.
CI runs it (``tests/test_gpu_check.py``).
"""
