"""The serving engine asked several questions at once, as concurrent requests ask them (test_serve, test_gpu)."""
import threading


def answers_together(engine, builder, questions: list[str], max_new_tokens: int, timeout_s: float = 120) -> list:
    """Each question's greedy answer (repetition penalty 2.0, as `answer` is asked in the tests), all asked at once from
    threads so that the engine decodes them in one batch; the engine is stopped afterwards."""
    from workbench.engine import Sampling

    results: list = [None] * len(questions)
    try:
        def run(i):
            results[i] = engine.generate(builder.generation_prompt(questions[i]),
                                         Sampling(max_new_tokens, 0.0, repetition_penalty=2.0), timeout_s)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
    finally:
        engine.stop()
    return [r[0] if r else None for r in results]
