"""Starter-kit file interface of the tournament agents.

    python -m agents.question_agent --num_questions N --output_file questions.json
    python -m agents.answer_agent --input_file questions.json --output_file answers.json

Both load the promoted artifact named by $RUNNER_ARTIFACT when it is set (the serving image sets it),
otherwise `--registry`, or `--model` (+ `--adapter`); the default model is the offline `tiny` one.
"""
