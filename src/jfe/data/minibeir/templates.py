"""Wording: task instructions and modification / question templates, each with held-out rewordings.

The first list of each pair is used to build queries (and for training); the second list is never used in
queries' ``query_txt`` and is stored as ``query_txt_heldout`` / ``heldout_instructions.tsv`` so evaluation
can test whether a model generalises to new phrasings.
"""

from __future__ import annotations

# (dataset name, task id) -> (instructions, held-out instructions)
INSTRUCTIONS: dict[tuple[str, int], tuple[list[str], list[str]]] = {
    ("emoji", 0): (["Retrieve the emoji image that matches this name", "Find the emoji that this text names",
                    "Show the emoji picture for this description"],
                   ["Which emoji picture fits these words", "Look up the image of the emoji called this"]),
    ("emoji", 1): (["Translate this emoji name into its English name", "Find the English name of the emoji "
                    "named here in another language", "Retrieve the English emoji name with the same meaning"],
                   ["Give the English emoji name for this foreign one", "Match this name to the English one"]),
    ("emoji", 2): (["Retrieve the emoji, picture and name, that fits these keywords",
                    "Find the emoji described by these keywords", "Show the emoji and its name for these words"],
                   ["Which emoji goes with these tags", "Look up the emoji entry these keywords point to"]),
    ("emoji", 3): (["Retrieve the name of this emoji", "Find the text that names this emoji picture",
                    "What is this emoji called"],
                   ["Give the CLDR name of the pictured emoji", "Name the emoji shown"]),
    ("emoji", 4): (["Find the same emoji drawn in the OpenMoji style", "Retrieve this emoji in another design",
                    "Show the OpenMoji version of this emoji"],
                   ["Match the emoji across drawing styles", "Which OpenMoji drawing is the same emoji"]),
    ("emoji", 6): (["Answer the question about this emoji", "Look at the emoji and retrieve the answer to the "
                    "question", "Find the text that answers the question about the picture"],
                   ["Reply to the question using the emoji shown", "Pick the right answer for this image"]),
    ("emoji", 7): (["Retrieve the emoji image after applying the change to the reference emoji",
                    "Edit the emoji as the text says and find the result", "Find the emoji picture that the "
                    "reference becomes after the modification"],
                   ["Apply the described edit to this emoji and show the outcome",
                    "Which emoji do you get by changing this one as described"]),
    ("emoji", 8): (["Retrieve the emoji, picture and name, after applying the change to the reference emoji",
                    "Edit the emoji as the text says and find the resulting emoji entry",
                    "Find the emoji and its name that the reference becomes after the modification"],
                   ["Apply the described edit and return the resulting emoji with its name",
                    "Which emoji entry results from changing this one as described"]),
    ("clipart", 0): (["Retrieve the clip-art drawing with this title", "Find the drawing this title names",
                      "Show the clip-art image for this caption"],
                     ["Which drawing carries this title", "Look up the clip-art picture called this"]),
    ("clipart", 1): (["Retrieve the title of the clip-art drawing described here", "Find the drawing title "
                      "that fits this description", "Which clip-art title matches these words"],
                     ["Give the title that goes with this description", "Name the drawing described"]),
    ("clipart", 2): (["Retrieve the clip-art drawing and its title for these keywords",
                      "Find the drawing, with its title, that these keywords describe",
                      "Show the clip-art entry matching these words"],
                     ["Which drawing and title go with these tags", "Look up the clip-art entry for these "
                      "keywords"]),
    ("clipart", 3): (["Retrieve the title of this clip-art drawing", "Find the caption that names this drawing",
                      "What is this drawing called"],
                     ["Give this picture's title", "Name the clip-art shown"]),
}

SKIN_PHRASE = {0: "the default yellow skin tone", 1: "light skin tone", 2: "medium-light skin tone",
               3: "medium skin tone", 4: "medium-dark skin tone", 5: "dark skin tone"}
SKIN_SHORT = {0: "default yellow", 1: "light", 2: "medium-light", 3: "medium", 4: "medium-dark", 5: "dark"}

# modification type -> (templates, held-out templates); {x} placeholders are filled per query
EDITS: dict[str, tuple[list[str], list[str]]] = {
    "skin_tone": (["with {skin}", "change the skin to {skin}", "make it {skin}"],
                  ["give it {short} skin", "the same but {short}-skinned"]),
    "skin_shift": (["{n} shade{s} {way} skin", "make the skin {n} shade{s} {way}", "skin tone {n} step{s} {way}"],
                   ["shift the skin colour {n} notch{es} {way}", "go {n} tone{s} {way} on the skin"]),
    "gender": (["as a {g}", "make it a {g}", "change the figure to a {g}"],
               ["the {g} version", "turn the person into a {g}"]),
    "gender_flip": (["the opposite gender", "swap the gender", "switch man and woman"],
                    ["flip the gender", "the other sex"]),
    "hair": (["with {h}", "give them {h}", "change the hair to {h}"],
             ["a version with {h}", "restyle: {h}"]),
    "direction": (["{d}", "make it {d}", "turned so it is {d}"],
                  ["now {d}", "orient it {d}"]),
    "direction_flip": (["turned the other way", "mirror the direction", "facing the opposite way"],
                       ["reverse the way it goes", "flip it around"]),
    "two_changes": (["{a}, {b}", "{a} and {b}", "change two things: {a}; {b}"],
                    ["both {a} and {b}", "{b}, also {a}"]),
    "clock_shift": (["{t} {way}", "the time {t} {way}", "move the hands {t} {way}"],
                    ["what it shows {t} {way}", "advance the clock by {signed}"]),
    "moon_step": (["{step}", "the moon {step}", "go to {step}"],
                  ["show {step} in the lunar cycle", "the lunar phase: {step}"]),
    "keycap_arith": (["{op}", "the keycap for this number {op}", "compute: the number {op}"],
                     ["the digit {op}: which keycap", "result of the number {op}"]),
    "colour_swap": (["the same shape in {c}", "recolour it {c}", "make it {c}"],
                    ["same form, colour {c}", "paint it {c}"]),
    "shape_swap": (["a {sh} of the same colour", "same colour but a {sh}", "change the shape to a {sh}"],
                   ["keep the colour, make it a {sh}", "the {sh} in this colour"]),
    "colour_shape_swap": (["a {sh} in {c}", "change it to a {c} {sh}", "{c} and a {sh} instead"],
                          ["swap both: {c}, {sh}", "a {sh}, coloured {c}"]),
    "arrow_rotate": (["rotated {deg} degrees {dir}", "turn it {deg} degrees {dir}", "rotate by {deg} {dir}"],
                     ["spin it {deg} degrees {dir}", "a {deg}-degree {dir} turn"]),
}

# question type -> (templates, held-out templates)
QUESTIONS: dict[str, tuple[list[str], list[str]]] = {
    "name_in_language": (["what is its name in {lang}", "how is this emoji called in {lang}",
                          "its {lang} name"], ["say its name in {lang}", "translate its name to {lang}"]),
    "category": (["which subgroup of emoji does it belong to", "what kind of emoji is this",
                  "its emoji subgroup"], ["in which emoji section is it listed", "classify this emoji"]),
    "ask_skin": (["what skin tone does it have", "which skin tone is shown", "its skin tone"],
                 ["how dark is the skin", "name the skin colour"]),
    "ask_gender": (["is it a man, a woman or a person", "what gender is shown", "who is it: man, woman or "
                    "person"], ["which sex is depicted", "male, female or neutral"]),
    "ask_role": (["what is this person doing or what is their job", "what is their role",
                  "what activity or job is shown"], ["name the occupation or action", "what do they do"]),
    "ask_hair": (["what hair does the person have", "describe the hair", "which hairstyle is shown"],
                 ["what is on their head", "name the hair"]),
    "ask_direction": (["which way is it facing or pointing", "what direction does it face",
                       "where does it point"], ["name its orientation", "which side is it turned to"]),
    "clock_shift": (["what time will it show {t} {way}", "the time {t} {way}", "which clock face is {t} {way}"],
                    ["tell the time {t} {way}", "{t} {way}, what does the clock read"]),
    "moon_step": (["which moon phase is {step}", "name {step}", "what is {step}"],
                  ["which phase do we see {step}", "lunar phase {step}"]),
    "keycap_arith": (["which keycap shows this number {op}", "the number {op}", "what is this number {op}"],
                     ["compute this digit {op}", "name the keycap for the digit {op}"]),
    "colour_swap": (["what is the same shape in {c} called", "name this shape in {c}", "the {c} one of this "
                     "shape"], ["this shape coloured {c}: its name", "what do we call it in {c}"]),
    "shape_swap": (["what is a {sh} of the same colour called", "name the {sh} in this colour",
                    "this colour as a {sh}"], ["its colour on a {sh}: the name", "a {sh} like this, named"]),
    "arrow_rotate": (["which arrow is this rotated {deg} degrees {dir}", "name it after a {deg} degree {dir} "
                      "turn", "the arrow turned {deg} degrees {dir}"],
                     ["after spinning {deg} degrees {dir}, which arrow", "rotate {deg} {dir}: the arrow's name"]),
}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
