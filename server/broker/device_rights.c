/*
 * device_rights: the operational listener's ACL (see device_rights.h for the grammar).
 *
 * Mirrors what Mosquitto 2.0.11's acl_file did (src/security_default.c), which the broker
 * tests pin, but looks a user up in a hash table instead of a linked list (its parse grew
 * with the square of the number of user blocks) and lets one device's entry be replaced
 * without re-reading the file.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#include "device_rights.h"

#define MAX_ID 64
#define MAX_LINE 1024
#define MAX_RULES 256 /* acl_rules.py: at most 64 rules + 2 tier lines per device */
#define MIN_BUCKETS 1024
#define STACK_TOPIC 512

struct rule {
	int access; /* MOSQ_ACL_READ | MOSQ_ACL_WRITE, or MOSQ_ACL_NONE for deny */
	char *topic;
};

struct rule_list {
	struct rule *items;
	size_t count;
	size_t capacity;
};

struct device_rights {
	char *user;
	struct rule_list rules;
	bool closed; /* a malformed line: no rights at all */
	struct device_rights *next;
};

struct rights_table {
	struct device_rights **buckets;
	size_t bucket_count;
	size_t device_count;
	struct rule_list patterns;
};

static struct rights_table *live;
static int references;

bool rights_valid_id(const char *id, size_t len)
{
	if(len == 0 || len > MAX_ID) return false;
	for(size_t i = 0; i < len; i++){
		char c = id[i];
		bool alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
		if(!alnum && (i == 0 || !strchr("_.:-", c))) return false;
	}
	return true;
}

static uint64_t hash(const char *text)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for(; *text; text++){
		h ^= (unsigned char)*text;
		h *= 1099511628211ULL;
	}
	return h;
}

/* --- rules ------------------------------------------------------------------------- */

static void rules_free(struct rule_list *list)
{
	for(size_t i = 0; i < list->count; i++) free(list->items[i].topic);
	free(list->items);
	memset(list, 0, sizeof(*list));
}

static bool rules_push(struct rule_list *list, int access, const char *topic)
{
	if(list->count >= MAX_RULES) return false;
	if(list->count == list->capacity){
		size_t capacity = list->capacity ? list->capacity * 2 : 4;
		struct rule *grown = realloc(list->items, capacity * sizeof(*grown));
		if(grown == NULL) return false;
		list->items = grown;
		list->capacity = capacity;
	}
	char *copy = strdup(topic);
	if(copy == NULL) return false;
	list->items[list->count].access = access;
	list->items[list->count].topic = copy;
	list->count++;
	return true;
}

static int parse_access(const char *word, size_t len)
{
	if(len == 4 && !strncmp(word, "read", 4)) return MOSQ_ACL_READ;
	if(len == 5 && !strncmp(word, "write", 5)) return MOSQ_ACL_WRITE;
	if(len == 9 && !strncmp(word, "readwrite", 9)) return MOSQ_ACL_READ | MOSQ_ACL_WRITE;
	if(len == 4 && !strncmp(word, "deny", 4)) return MOSQ_ACL_NONE;
	return -1;
}

/* "<access> <topic>": one space between, a valid topic filter without blanks or control
 * characters (and, in a `topic` line, without the '%' that only patterns substitute). */
static bool parse_rule(const char *text, bool pattern, int *access, const char **topic)
{
	const char *space = strchr(text, ' ');
	if(space == NULL) return false;
	*access = parse_access(text, (size_t)(space - text));
	*topic = space + 1;
	if(*access < 0 || **topic == '\0' || strlen(*topic) > MAX_LINE) return false;
	for(const unsigned char *c = (const unsigned char *)*topic; *c; c++){
		if(*c <= ' ' || *c == 0x7f || (!pattern && *c == '%')) return false;
	}
	return mosquitto_sub_topic_check(*topic) == MOSQ_ERR_SUCCESS;
}

/* --- the table --------------------------------------------------------------------- */

static void device_free(struct device_rights *device)
{
	if(device == NULL) return;
	rules_free(&device->rules);
	free(device->user);
	free(device);
}

static void table_free(struct rights_table *table)
{
	if(table == NULL) return;
	for(size_t i = 0; i < table->bucket_count; i++){
		struct device_rights *device = table->buckets[i];
		while(device){
			struct device_rights *next = device->next;
			device_free(device);
			device = next;
		}
	}
	free(table->buckets);
	rules_free(&table->patterns);
	free(table);
}

static struct rights_table *table_new(void)
{
	struct rights_table *table = calloc(1, sizeof(*table));
	if(table == NULL) return NULL;
	table->buckets = calloc(MIN_BUCKETS, sizeof(*table->buckets));
	if(table->buckets == NULL){
		free(table);
		return NULL;
	}
	table->bucket_count = MIN_BUCKETS;
	return table;
}

static struct device_rights **table_slot(struct rights_table *table, const char *user)
{
	struct device_rights **slot = &table->buckets[hash(user) & (table->bucket_count - 1)];
	while(*slot && strcmp((*slot)->user, user)) slot = &(*slot)->next;
	return slot;
}

static void table_grow(struct rights_table *table)
{
	size_t count = table->bucket_count * 2;
	struct device_rights **buckets = calloc(count, sizeof(*buckets));
	if(buckets == NULL) return; /* longer chains, still correct */
	for(size_t i = 0; i < table->bucket_count; i++){
		struct device_rights *device = table->buckets[i];
		while(device){
			struct device_rights *next = device->next;
			size_t index = hash(device->user) & (count - 1);
			device->next = buckets[index];
			buckets[index] = device;
			device = next;
		}
	}
	free(table->buckets);
	table->buckets = buckets;
	table->bucket_count = count;
}

/* Put ``device`` in place of the entry of the same user (freed), or add it. */
static void table_put(struct rights_table *table, struct device_rights *device)
{
	struct device_rights **slot = table_slot(table, device->user);
	if(*slot){
		device->next = (*slot)->next;
		device_free(*slot);
	}else{
		device->next = NULL;
		table->device_count++;
	}
	*slot = device;
	if(table->device_count > table->bucket_count) table_grow(table);
}

static void table_remove(struct rights_table *table, const char *user)
{
	struct device_rights **slot = table_slot(table, user);
	if(*slot == NULL) return;
	struct device_rights *found = *slot;
	*slot = found->next;
	device_free(found);
	table->device_count--;
}

/* --- the file ---------------------------------------------------------------------- */

struct device_rights *rights_block_new(const char *id)
{
	if(!rights_valid_id(id, strlen(id))) return NULL;
	struct device_rights *device = calloc(1, sizeof(*device));
	if(device == NULL) return NULL;
	device->user = strdup(id);
	if(device->user == NULL){
		free(device);
		return NULL;
	}
	return device;
}

bool rights_block_add(struct device_rights *block, const char *line)
{
	int access;
	const char *topic;
	if(block->closed) return false;
	if(strncmp(line, "topic ", 6) || !parse_rule(line + 6, false, &access, &topic)
			|| !rules_push(&block->rules, access, topic)){
		block->closed = true;
		rules_free(&block->rules);
		return false;
	}
	return true;
}

static void bad_line(const char *path, size_t lineno, const char *why)
{
	mosquitto_log_printf(MOSQ_LOG_WARNING, "provisioning_guard: %s line %zu ignored: %s",
			path, lineno, why);
}

/* One line of the file (trailing blanks removed); ``user`` is the block being read. */
static void file_line(struct rights_table *table, struct device_rights **user, char *line,
		const char *path, size_t lineno)
{
	int access;
	const char *topic;
	if(line[0] == '\0' || line[0] == '#') return;
	if(!strncmp(line, "pattern ", 8)){
		if(!parse_rule(line + 8, true, &access, &topic)){
			bad_line(path, lineno, "malformed pattern");
		}else if(!rules_push(&table->patterns, access, topic)){
			bad_line(path, lineno, "out of memory");
		}
	}else if(!strncmp(line, "user ", 5)){
		*user = NULL;
		const char *id = line + 5;
		if(!rights_valid_id(id, strlen(id))){
			bad_line(path, lineno, "not a device id (its topic lines are skipped)");
			return;
		}
		struct device_rights **slot = table_slot(table, id);
		if(*slot == NULL){ /* a second block of the same user adds to the first, as acl_file */
			struct device_rights *device = rights_block_new(id);
			if(device == NULL){
				bad_line(path, lineno, "out of memory");
				return;
			}
			table_put(table, device);
			slot = table_slot(table, id);
		}
		*user = *slot;
	}else if(!strncmp(line, "topic ", 6)){
		if(*user == NULL){
			bad_line(path, lineno, "topic line outside a valid user block");
		}else if(!rights_block_add(*user, line)){
			bad_line(path, lineno, "malformed topic line: the device has no rights");
		}
	}else{
		bad_line(path, lineno, "unknown line");
	}
}

int rights_load_file(const char *path)
{
	FILE *file = fopen(path, "r");
	if(file == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "provisioning_guard: cannot read %s", path);
		return MOSQ_ERR_UNKNOWN;
	}
	struct rights_table *table = table_new();
	struct device_rights *user = NULL;
	char *line = NULL;
	size_t size = 0, lineno = 0;
	ssize_t len;
	while(table && (len = getline(&line, &size, file)) >= 0){
		lineno++;
		while(len > 0 && isspace((unsigned char)line[len - 1])) line[--len] = '\0';
		if(strlen(line) != (size_t)len || len > MAX_LINE){
			if(user) rights_block_add(user, ""); /* inside a block: the device fails closed */
			bad_line(path, lineno, "NUL byte or longer than 1024 bytes");
			continue;
		}
		file_line(table, &user, line, path, lineno);
	}
	free(line);
	bool failed = table == NULL || ferror(file);
	fclose(file);
	if(failed){
		table_free(table);
		mosquitto_log_printf(MOSQ_LOG_ERR, "provisioning_guard: reading %s failed; rights unchanged",
				path);
		return MOSQ_ERR_UNKNOWN;
	}
	table_free(live);
	live = table;
	mosquitto_log_printf(MOSQ_LOG_INFO, "provisioning_guard: %s: %zu patterns, %zu devices",
			path, table->patterns.count, table->device_count);
	return MOSQ_ERR_SUCCESS;
}

void rights_block_commit(struct device_rights *block)
{
	if(live == NULL && (live = table_new()) == NULL){
		device_free(block);
		return;
	}
	if(block->rules.count == 0 && !block->closed){
		table_remove(live, block->user);
		device_free(block);
	}else{
		table_put(live, block);
	}
}

void rights_block_free(struct device_rights *block)
{
	device_free(block);
}

size_t rights_device_count(void)
{
	return live ? live->device_count : 0;
}

void rights_retain(void)
{
	references++;
}

void rights_release(void)
{
	if(references > 0 && --references == 0){
		table_free(live);
		live = NULL;
	}
}

/* --- checks ------------------------------------------------------------------------ */

static bool matches(const char *sub, const char *topic)
{
	bool result = false;
	if(topic[0] == '$' && sub[0] != '$') return false;
	mosquitto_topic_matches_sub(sub, topic, &result);
	return result;
}

/* 1 granted, 0 denied, -1 no rule matched. Denials are looked at first. */
static int rules_decide(const struct rule_list *list, const char *topic, int access)
{
	for(size_t i = 0; i < list->count; i++){
		if(list->items[i].access == MOSQ_ACL_NONE && matches(list->items[i].topic, topic)) return 0;
	}
	for(size_t i = 0; i < list->count; i++){
		const struct rule *rule = &list->items[i];
		if((rule->access & access) && matches(rule->topic, topic)) return 1;
	}
	return -1;
}

/* ``pattern`` with %u and %c substituted, into ``out`` (or a malloc'd copy if longer). */
static char *substitute(const char *pattern, const char *user, const char *id, char *out,
		size_t size)
{
	size_t len = 0;
	for(const char *p = pattern; *p; p++){
		if(p[0] == '%' && (p[1] == 'u' || p[1] == 'c')){
			len += strlen(p[1] == 'u' ? user : id);
			p++;
		}else{
			len++;
		}
	}
	char *result = len < size ? out : malloc(len + 1);
	if(result == NULL) return NULL;
	char *s = result;
	for(const char *p = pattern; *p; p++){
		if(p[0] == '%' && (p[1] == 'u' || p[1] == 'c')){
			const char *with = p[1] == 'u' ? user : id;
			size_t n = strlen(with);
			memcpy(s, with, n);
			s += n;
			p++;
		}else{
			*s++ = *p;
		}
	}
	*s = '\0';
	return result;
}

static int patterns_decide(const char *user, const char *id, const char *topic, int access)
{
	const struct rule_list *list = &live->patterns;
	char buffer[STACK_TOPIC];
	for(int pass = 0; pass < 2; pass++){ /* denials first */
		for(size_t i = 0; i < list->count; i++){
			const struct rule *rule = &list->items[i];
			bool deny = rule->access == MOSQ_ACL_NONE;
			if(deny != (pass == 0) || (!deny && !(rule->access & access))) continue;
			char *sub = substitute(rule->topic, user, id, buffer, sizeof(buffer));
			if(sub == NULL) return MOSQ_ERR_NOMEM;
			bool hit = matches(sub, topic);
			if(sub != buffer) free(sub);
			if(hit) return deny ? MOSQ_ERR_ACL_DENIED : MOSQ_ERR_SUCCESS;
		}
	}
	return MOSQ_ERR_ACL_DENIED;
}

int rights_check(const struct mosquitto *client, const char *topic, int access)
{
	const char *user = mosquitto_client_username(client);
	const char *id = mosquitto_client_id(client);
	if(live == NULL || user == NULL || id == NULL) return MOSQ_ERR_ACL_DENIED;
	struct device_rights *device = *table_slot(live, user);
	if(device){
		if(device->closed) return MOSQ_ERR_ACL_DENIED;
		int decided = rules_decide(&device->rules, topic, access);
		if(decided >= 0) return decided ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
	}
	/* As acl_file: a username or client id with a wildcard could widen a pattern. */
	if(strpbrk(user, "+#") || strpbrk(id, "+#")) return MOSQ_ERR_ACL_DENIED;
	return patterns_decide(user, id, topic, access);
}
