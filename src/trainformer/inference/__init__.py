"""Inference: a trained model directory put to work, one class per kind of job.

- `translator.py`: `Translator` (and what every translation engine shares, `translate_in_order`)
- `tagger.py`: `Tagger`, BIO tags of words and entities of raw lines
- `relations.py`: `RelationClassifier`, the relation between two marked entities
- `chatbot.py`: `Chatbot`, a conversation whose replies a sampling engine writes
- `sampling.py`: sampled continuations of a decoder (`SamplingSettings`, `TorchGenerator`)
- `loading.py`: a model directory (or an ensemble, `ensemble.py`) into one of the above
- `bio.py`, `crf.py`: BIO tags, their constrained Viterbi and the CRF, shared with the NER task
- `common.py`: autocast at the chosen precision, length batches

The tasks evaluate through these classes, so this layer sits below `tasks/`;
each class takes explicit arguments (model, tokenizer, precision, ...), never
parsed command-line flags.
"""
